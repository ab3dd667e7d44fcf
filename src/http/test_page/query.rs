//! The `/test/` page's own query string, kept whole across every link and form on the
//! page: a strategy link changes only `strategy`, a form redirects back to the same query,
//! and the JSON link drops only what belongs to the page and not to a probe.

use url::form_urlencoded;

/// Fields of the page that are not probe fields: the JSON API would refuse them.
pub const PAGE_ONLY_FIELDS: [&str; 2] = ["watch", "interval_ms"];

/// The page's query as given, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageQuery(Vec<(String, String)>);

impl PageQuery {
    pub fn parse(raw: Option<&str>) -> Self {
        let pairs = form_urlencoded::parse(raw.unwrap_or("").as_bytes());
        PageQuery(pairs.into_owned().collect())
    }

    /// The same query with `name` set to `value` (replaced where it was, else appended).
    pub fn with(&self, name: &str, value: &str) -> Self {
        let mut pairs = self.0.clone();
        match pairs.iter_mut().find(|(key, _)| key == name) {
            Some(pair) => pair.1 = value.to_owned(),
            None => pairs.push((name.to_owned(), value.to_owned())),
        }
        PageQuery(pairs)
    }

    /// The same query without the fields in `names`.
    pub fn without(&self, names: &[&str]) -> Self {
        let pairs = self
            .0
            .iter()
            .filter(|(key, _)| !names.contains(&key.as_str()));
        PageQuery(pairs.cloned().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// `path`, with `?` and the query when there is one (not yet HTML-escaped).
    pub fn url(&self, path: &str) -> String {
        if self.0.is_empty() {
            return path.to_owned();
        }
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        serializer.extend_pairs(&self.0);
        format!("{path}?{}", serializer.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_keep_every_field_and_change_only_theirs() {
        let query = PageQuery::parse(Some("watch=1&strategy=lsn-wait&poll_interval_ms=5&x=a%26b"));
        assert_eq!(
            query.with("strategy", "primary").url("/test/"),
            "/test/?watch=1&strategy=primary&poll_interval_ms=5&x=a%26b"
        );
        assert_eq!(
            query.without(&PAGE_ONLY_FIELDS).url("/api/probe"),
            "/api/probe?strategy=lsn-wait&poll_interval_ms=5&x=a%26b"
        );
        assert_eq!(PageQuery::parse(None).url("/test/"), "/test/");
        assert_eq!(
            PageQuery::parse(None)
                .with("strategy", "replica")
                .url("/test/"),
            "/test/?strategy=replica"
        );
        assert_eq!(query.get("watch"), Some("1"));
    }
}
