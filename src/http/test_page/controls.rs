//! The page's controls, all plain links and HTML forms so that they work without
//! JavaScript: one link per strategy (the current one marked in words, not only in style),
//! and in a lab the delay and jitter, cutting and healing the link, and each server's state
//! with stop and start buttons. Forms POST to small handlers that call the fault-lab API
//! and redirect back (303) to this page with its query unchanged.

use std::fmt::Write as _;

use super::{escape, query::PageQuery};
use crate::{
    lab::{DelaySettings, NodeState, ServerRole, ServerStatus},
    settings::{DELAY_MS, JITTER_MS, Strategy},
};

/// One link per strategy, keeping every other query field.
pub fn strategy_links(query: &PageQuery, current: Strategy) -> String {
    let mut html =
        String::from("<nav id=\"strategies\" aria-label=\"Read strategy\"><span>Strategy:</span>");
    for strategy in Strategy::ALL {
        let href = query.with("strategy", strategy.name()).url("/test/");
        if strategy == current {
            let _ = write!(
                html,
                "<a class=\"strategy current\" aria-current=\"page\" href=\"{}\">\
                 ✓ {strategy} <span class=\"hint\">(current)</span></a>",
                escape(&href)
            );
        } else {
            let _ = write!(
                html,
                "<a class=\"strategy\" href=\"{}\">{strategy}</a>",
                escape(&href)
            );
        }
    }
    html.push_str("</nav>");
    html
}

/// The link's state in words: a cut link is cut, whatever delay it will have when healed.
pub fn link_words(link: &DelaySettings) -> String {
    let jitter = if link.jitter.is_zero() {
        String::new()
    } else {
        format!(" + up to {} ms jitter", link.jitter.as_millis())
    };
    if link.link_down {
        format!(
            "CUT: no WAL reaches the replica (delay {} ms{jitter} once healed)",
            link.delay.as_millis()
        )
    } else {
        format!("{} ms{jitter}", link.delay.as_millis())
    }
}

const CUT_WORDS: &str = "Cut the link";
const HEAL_WORDS: &str = "Heal the link";

/// The delay form and the cut/heal button (outside the live part of the page, so that a
/// value being typed is not redrawn away; live mode refreshes the values it holds from the
/// live part's `#lab-link`, and the button's words from its data).
pub fn delay_forms(link: &DelaySettings, query: &PageQuery) -> String {
    let action = escape(&query.url("/test/delay"));
    let (cut_value, cut_words) = if link.link_down {
        ("false", HEAL_WORDS)
    } else {
        ("true", CUT_WORDS)
    };
    format!(
        "<section id=\"lab-controls\"><h2>Steer the lab</h2>\
         <form method=\"post\" action=\"{action}\" class=\"inline\">\
         <label>Delay (ms) <input type=\"number\" name=\"delay_ms\" min=\"0\" max=\"{}\" \
         value=\"{}\" required></label> \
         <label>Jitter (ms) <input type=\"number\" name=\"jitter_ms\" min=\"0\" max=\"{}\" \
         value=\"{}\" required></label> \
         <button type=\"submit\">Set delay</button></form>\
         <form method=\"post\" action=\"{action}\" class=\"inline\">\
         <input type=\"hidden\" name=\"link_down\" value=\"{cut_value}\">\
         <button type=\"submit\" id=\"cut-link\" data-cut-words=\"{CUT_WORDS}\" \
         data-heal-words=\"{HEAL_WORDS}\">{cut_words}</button></form></section>",
        DELAY_MS.max,
        link.delay.as_millis(),
        JITTER_MS.max,
        link.jitter.as_millis(),
    )
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Running => "running",
        NodeState::Stopping => "stopping",
        NodeState::Stopped => "stopped",
        NodeState::Killed => "killed",
        NodeState::Exited => "exited",
    }
}

fn role_name(role: ServerRole) -> &'static str {
    match role {
        ServerRole::Primary => "primary",
        ServerRole::Replica => "replica",
        ServerRole::FormerPrimary => "former primary (diverged; rejoin through a failover)",
    }
}

/// Each lab server with its state and the button that changes it.
pub fn servers_table(servers: &[ServerStatus], query: &PageQuery) -> String {
    let mut html = String::from(
        "<table id=\"servers\" class=\"data\"><caption>Lab servers</caption>\
         <tr><th>server</th><th>role</th><th>state</th><th></th></tr>",
    );
    for server in servers {
        let action = match (server.state, server.role) {
            (NodeState::Running, _) => Some(("stop", "Stop")),
            (_, ServerRole::FormerPrimary) | (NodeState::Stopping, _) => None,
            _ => Some(("start", "Start")),
        };
        let button = action.map_or_else(String::new, |(verb, words)| {
            let path = format!("/test/servers/{}/{verb}", server.name);
            format!(
                "<form method=\"post\" action=\"{}\"><button type=\"submit\" \
                 aria-label=\"{words} {}\">{words}</button></form>",
                escape(&query.url(&path)),
                escape(&server.name)
            )
        });
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"state\">{}</td><td>{button}</td></tr>",
            escape(&server.name),
            role_name(server.role),
            state_name(server.state)
        );
    }
    html.push_str("</table>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strategy_links_keep_the_query_and_mark_the_current_one_in_words() {
        let query = PageQuery::parse(Some("watch=1&strategy=replica&poll_interval_ms=5"));
        let html = strategy_links(&query, Strategy::LsnWait);
        assert!(
            html.contains("href=\"/test/?watch=1&amp;strategy=primary&amp;poll_interval_ms=5\""),
            "{html}"
        );
        assert!(html.contains("aria-current=\"page\""), "{html}");
        assert!(
            html.contains("✓ lsn-wait <span class=\"hint\">(current)"),
            "{html}"
        );
        assert_eq!(html.matches("aria-current").count(), 1);
    }

    #[test]
    fn a_cut_link_reads_as_cut() {
        let link = DelaySettings {
            delay: Duration::from_millis(200),
            jitter: Duration::ZERO,
            link_down: true,
        };
        assert!(link_words(&link).starts_with("CUT"));
        let forms = delay_forms(&link, &PageQuery::default());
        assert!(forms.contains("Heal the link"), "{forms}");
        assert!(forms.contains("value=\"false\""), "{forms}");
        assert!(
            forms.contains("data-cut-words=\"Cut the link\" data-heal-words=\"Heal the link\""),
            "{forms}"
        );
    }
}
