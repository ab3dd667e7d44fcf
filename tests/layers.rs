//! The crate's layering, checked on its source: data flows settings -> lab -> db -> error
//! -> probe -> service -> transports (grpc, http, proxy) -> server, and no module imports one
//! below it (or a sibling transport). `lsn` is a leaf anyone may use. Only db/ and the
//! lab's own bootstrap module talk SQL.

use std::{collections::BTreeSet, fs, path::Path};

/// Modules in layer order; a module may import only modules of a smaller rank.
const LAYERS: [(&str, u32); 11] = [
    ("lsn", 0),
    ("settings", 0),
    ("lab", 1),
    ("db", 2),
    ("error", 3),
    ("probe", 4),
    ("service", 5),
    ("grpc", 6),
    ("http", 6),
    ("proxy", 6),
    ("server", 7),
];

fn rank(module: &str) -> Option<u32> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, rank)| *rank)
}

/// The module a source file belongs to (`src/probe/run.rs` -> `probe`).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix("src").ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

fn source_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The file without its comments (doc links are not imports).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module a file names through `crate::`, in `use` trees or in paths.
fn crate_modules_named(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let code = code_of(text);
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(tree) = rest.strip_prefix('{') {
            // A use tree: the first segment of every path at depth 1.
            let mut depth = 1;
            let mut segment = String::new();
            let mut at_path_start = true;
            for c in tree.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => at_path_start = true,
                    c if depth == 1 && at_path_start && (c.is_alphanumeric() || c == '_') => {
                        segment.push(c)
                    }
                    _ if depth == 1 && at_path_start && !segment.is_empty() => {
                        named.insert(std::mem::take(&mut segment));
                        at_path_start = false;
                    }
                    _ => {}
                }
            }
            if !segment.is_empty() {
                named.insert(segment);
            }
        } else {
            let segment: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            named.insert(segment);
        }
    }
    named
}

#[test]
fn no_module_imports_one_below_it() {
    let mut files = Vec::new();
    source_files(Path::new("src"), &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(own_rank) = rank(&module) else {
            continue;
        };
        let text = fs::read_to_string(file).unwrap();
        for named in crate_modules_named(&text) {
            let Some(named_rank) = rank(&named) else {
                continue;
            };
            let leaf = named == "lsn";
            if named != module && !leaf && named_rank >= own_rank {
                violations.push(format!("{} ({module}) imports {named}", file.display()));
            }
        }
    }
    assert!(
        files.len() > 20,
        "found only {} source files: run from the crate root",
        files.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn the_check_sees_use_trees_and_paths() {
    let named = crate_modules_named(
        "use crate::{\n    db::{A, B},\n    error::Result,\n    settings,\n};\nlet x = crate::probe::millis(d);\n/// see [`crate::server`]",
    );
    let expected: BTreeSet<String> = ["db", "error", "settings", "probe"]
        .map(String::from)
        .into();
    assert_eq!(named, expected);
}

/// Whether a line of code holds an SQL statement in a string literal.
fn holds_sql(line: &str) -> bool {
    const VERBS: [&str; 5] = [
        "\"SELECT ",
        "\"INSERT ",
        "\"UPDATE ",
        "\"DELETE ",
        "\"CREATE ",
    ];
    VERBS.iter().any(|verb| line.contains(verb))
}

/// The file before its unit tests: a test's SQL (the proxy's classifier fixtures) is input
/// data, not a statement the crate sends.
fn without_unit_tests(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

#[test]
fn sql_is_written_only_in_db_and_the_labs_bootstrap() {
    let mut files = Vec::new();
    source_files(Path::new("src"), &mut files);
    let allowed = ["src/db.rs", "src/lab/sql.rs"];
    let mut statements = 0;
    let mut elsewhere = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let code = code_of(without_unit_tests(&text));
        let found = code.lines().filter(|line| holds_sql(line)).count();
        if allowed.iter().any(|allowed| file.ends_with(allowed)) {
            statements += found;
        } else if found > 0 {
            elsewhere.push(file.display().to_string());
        }
    }
    assert!(
        statements >= 10,
        "the check found only {statements} statements"
    );
    assert!(
        elsewhere.is_empty(),
        "SQL outside db.rs and lab/sql.rs: {elsewhere:?}"
    );
}
