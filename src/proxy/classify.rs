//! Which backend a statement may run on, decided by PostgreSQL's own parser (`pg_query`).
//!
//! The rule is "prove it read-only or send it to the primary": a statement reaches a replica
//! only when the parser shows it is a plain query (SELECT, VALUES, TABLE, EXPLAIN of one)
//! with no data-modifying CTE, no row locks, no `SELECT INTO`, and no function outside a
//! known-safe list (`nextval`, `setval` and any user function may write). Session commands
//! go to the primary, and the SETs among them are replayed on the replica connection later,
//! as are session-level `set_config(name, value, false)` calls with constant arguments.
//! Anything the parser rejects goes to the primary, which reports the error itself.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use pg_query::{NodeEnum, protobuf};
use serde_json::Value;

use super::wire::{BoundParameters, boolean_text};
use crate::db::session_sql;

mod shape;

/// Where a statement may run, before the strategy has its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Provably read-only: where the strategy sends reads.
    Read,
    /// Anything that may write, or that the parser cannot prove read-only.
    Primary,
}

/// A statement the proxy answers or learns from itself, instead of only forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyCommand {
    /// `SET lagprobe.<name> = '<value>'` (also `TO`), `RESET lagprobe.<name>` (value `None`).
    Set { name: String, value: Option<String> },
    /// `SHOW lagprobe.<name>`.
    Show { name: String },
}

/// A session setting to replay on the replica connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSet {
    /// The variable it sets, lowercased; `None` for RESET ALL and DISCARD ALL, which reset
    /// every earlier one.
    pub variable: Option<String>,
    /// The statement that sets it again.
    pub text: String,
    /// What it does to the session's default transaction isolation: a standby cannot run
    /// a serializable transaction, so a serializable session's reads go to the primary.
    pub isolation: IsolationChange,
}

/// What a setting does to the session's default transaction isolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationChange {
    #[default]
    Unchanged,
    Serializable,
    /// Read committed or repeatable read.
    NotSerializable,
    /// Back to the role's, database's or startup options' default.
    Reset,
}

impl IsolationChange {
    fn to(level: &str) -> Self {
        if level.eq_ignore_ascii_case("serializable") {
            IsolationChange::Serializable
        } else {
            IsolationChange::NotSerializable
        }
    }
}

impl SessionSet {
    fn new(variable: Option<String>, text: String) -> Self {
        SessionSet {
            variable,
            text,
            isolation: IsolationChange::Unchanged,
        }
    }
}

/// What the proxy learnt about one query string (one or more statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub route: Route,
    /// Whether a statement may change data (not only session state): the session's
    /// consistency token moves after it commits.
    pub writes: bool,
    /// Session settings to replay on the replica connection, in order, once they succeed on
    /// the primary.
    pub session_sets: Vec<SessionSet>,
    /// set_config calls with Bind parameters: each Bind's values make their settings.
    pub bound_set_configs: Vec<SetConfig>,
    /// DISCARD ALL or DEALLOCATE ALL: every prepared statement of the session is gone.
    pub deallocates_all: bool,
    /// `DEALLOCATE name`: that prepared statement is gone (on the primary, where it ran).
    pub deallocates: Vec<String>,
    /// Temporary relations it creates: they exist in the primary connection's session only.
    pub temp_creates: Vec<String>,
    /// DISCARD TEMP or DISCARD ALL: the session's temporary relations are gone.
    pub discards_temp: bool,
    /// BEGIN READ ONLY: the transaction may read the session's temporary relations, which
    /// nothing in the BEGIN names.
    pub begins_read_only: bool,
    /// A read's relations as the parser names them (`t`, `schema.t`), so that a read of one
    /// of the session's temporary relations can be sent where that relation is.
    pub relations: Vec<String>,
    /// Set when the whole string is one `lagprobe.*` command.
    pub command: Option<ProxyCommand>,
    /// A read's pg_query fingerprint, the audit's key: the same for every constant and
    /// parameter value, so `WHERE id = 1` and `WHERE id = 2` count as one query.
    pub fingerprint: Option<u64>,
}

impl Classified {
    /// A read for the strategy to place (the `lagprobe.*` commands are answered by the
    /// proxy, and are not audited).
    fn is_read(&self) -> bool {
        self.route == Route::Read && self.command.is_none()
    }

    pub(super) fn primary() -> Self {
        Classified {
            route: Route::Primary,
            writes: true,
            session_sets: Vec::new(),
            bound_set_configs: Vec::new(),
            deallocates_all: false,
            deallocates: Vec::new(),
            temp_creates: Vec::new(),
            discards_temp: false,
            begins_read_only: false,
            relations: Vec::new(),
            command: None,
            fingerprint: None,
        }
    }
}

/// A routing hint in a leading comment: `/* lagprobe:primary */` or `/* lagprobe:replica */`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    /// The statement counts as a read (the strategy still decides where reads go).
    Replica,
}

/// The hint in `sql`'s first comment, if it is one.
pub fn hint(sql: &str) -> Option<Hint> {
    let body = sql.trim_start().strip_prefix("/*")?;
    let (comment, _) = body.split_once("*/")?;
    match comment.trim() {
        "lagprobe:primary" => Some(Hint::Primary),
        "lagprobe:replica" => Some(Hint::Replica),
        _ => None,
    }
}

/// Functions that cannot write or change session state, by their unqualified or
/// `pg_catalog.` name. Everything else (user functions, `nextval`, `setval`, `set_config`,
/// `pg_advisory_lock`, `txid_current`, `lo_*`, `dblink`, ...) sends the statement to the
/// primary. Deliberately short: a missing entry costs a primary read, never a failed one.
const SAFE_FUNCTIONS: &[&str] = &[
    // aggregates and window functions
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "variance",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "ntile",
    // scalars
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "random",
    "greatest",
    "least",
    "coalesce",
    "nullif",
    "length",
    "char_length",
    "lower",
    "upper",
    "substr",
    "substring",
    "position",
    "strpos",
    "replace",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "concat",
    "concat_ws",
    "format",
    "left",
    "right",
    "split_part",
    "md5",
    "encode",
    "decode",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "starts_with",
    "repeat",
    "reverse",
    "initcap",
    "gen_random_uuid",
    "uuid_generate_v4",
    // date and time
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "date_trunc",
    "date_part",
    "extract",
    "age",
    "make_interval",
    "make_date",
    "make_timestamp",
    "make_timestamptz",
    "timezone",
    // json and arrays
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "jsonb_set",
    "jsonb_pretty",
    "jsonb_array_elements",
    "json_array_elements",
    "jsonb_each",
    "json_each",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_typeof",
    "array_length",
    "cardinality",
    "unnest",
    "array_position",
    "array_to_string",
    "string_to_array",
    "generate_series",
    // introspection
    "current_setting",
    "current_database",
    "current_schema",
    "current_user",
    "session_user",
    "version",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_backend_pid",
    "pg_sleep",
    "pg_typeof",
    "pg_postmaster_start_time",
    "pg_size_pretty",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_database_size",
    "inet_server_port",
    "inet_server_addr",
    "format_type",
    "pg_get_userbyid",
    "pg_table_is_visible",
    "obj_description",
    "col_description",
    "has_table_privilege",
    "quote_ident",
    "quote_literal",
];

fn function_is_safe(qualified: &[&str]) -> bool {
    let name = match qualified {
        [name] | ["pg_catalog", name] => name,
        _ => return false,
    };
    SAFE_FUNCTIONS.contains(&name.to_ascii_lowercase().as_str())
}

/// Classifies a query string: every statement in it must be a read for it to be a read.
/// Sessions go through a [`Cache`]; this is the same verdict without one.
#[cfg(test)]
pub fn classify(sql: &str) -> Classified {
    let hinted = hint(sql);
    if hinted == Some(Hint::Primary) {
        return Classified::primary();
    }
    let (mut classified, _) = classify_parsed(sql, hinted);
    if classified.is_read() {
        classified.fingerprint = pg_query::fingerprint(sql, 0, 0)
            .ok()
            .map(|fingerprint| fingerprint.value);
    }
    classified
}

/// The parser's verdict on `sql` (without its fingerprint), and whether that verdict
/// follows from the fingerprint alone. It does when every statement is a query or a
/// statement that always writes: then only the tree's shape (node types, names, function
/// names, locking and INTO clauses) decides, and the fingerprint keeps all of that; it
/// drops only constants, aliases and a few names. Anything whose classification reads a
/// constant or a name the fingerprint drops (BEGIN READ ONLY's option, SET's value,
/// DEALLOCATE's name, the `lagprobe.*` commands) and any hinted text is classified by its
/// own text every time.
fn classify_parsed(sql: &str, hinted: Option<Hint>) -> (Classified, bool) {
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return (Classified::primary(), false);
    };
    let mut classified = Classified {
        route: Route::Read,
        writes: false,
        ..Classified::primary()
    };
    let mut by_shape = hinted.is_none();
    let statements = &parsed.protobuf.stmts;
    for raw in statements {
        let Some(node) = raw.stmt.as_ref().and_then(|stmt| stmt.node.as_ref()) else {
            continue;
        };
        let text = statement_text(sql, raw);
        if statements.len() == 1 {
            classified.command = proxy_command(node);
            if classified.command.is_some() {
                return (classified, false);
            }
        }
        let kind = statement(node, text, &mut classified);
        by_shape &= kind == Kind::Write
            || matches!(node, NodeEnum::SelectStmt(_) | NodeEnum::ExplainStmt(_));
        match kind {
            Kind::Read => {}
            Kind::Session => classified.route = Route::Primary,
            Kind::Write => {
                classified.route = Route::Primary;
                classified.writes = true;
            }
        }
    }
    if hinted == Some(Hint::Replica) && classified.session_sets.is_empty() {
        classified.route = Route::Read;
        classified.writes = false;
    }
    // Settings to replay carry their values, which the shape and the fingerprint drop.
    by_shape &= classified.session_sets.is_empty() && classified.bound_set_configs.is_empty();
    if classified.route == Route::Read {
        classified.relations = relation_names(&parsed);
    }
    (classified, by_shape)
}

/// A session's own cache: its client can only slow itself, so foldhash (not SipHash),
/// which every query's lookup pays for.
type Map<K> = HashMap<K, Arc<Classified>, foldhash::fast::RandomState>;

/// Classifications a session has made, so that a repeated query is not parsed again:
/// by text (a prepared statement's or ORM's text repeats exactly), and for verdicts that
/// follow from the fingerprint ([`classify_parsed`]) by the text's shape with its
/// constants masked ([`shape`]) and by fingerprint. So the same query with other constants
/// (`WHERE id = 1`, `WHERE id = 2` in the simple protocol) costs a pass over its text, or
/// where its text has no shape one fingerprint (one parse in C, without the parse tree's
/// trip to Rust). What a session has not met yet it looks up in the proxy's
/// [`SharedCache`] before it parses.
#[derive(Debug, Default)]
pub struct Cache {
    by_text: Texts,
    by_shape: Texts,
    by_fingerprint: Map<u64>,
    /// The last text's shape, kept to save an allocation per query.
    shape: String,
}

impl Cache {
    /// Entries each map keeps at most; a full map starts over (a session whose queries
    /// never repeat gains nothing from keeping them).
    const ENTRIES: usize = 1024;
    /// The bytes of text each of a session's text maps keeps at most.
    const TEXT_BYTES: usize = 128 << 10;

    /// `sql`'s classification; `first_seen` is called with a read's fingerprint when it is
    /// parsed (for the audit to make room for it).
    pub fn classify(
        &mut self,
        sql: &str,
        shared: &SharedCache,
        first_seen: impl FnOnce(u64),
    ) -> Arc<Classified> {
        if let Some(known) = self.by_text.get(sql) {
            return Arc::clone(known);
        }
        let shaped = shape::literal_shape(sql, &mut self.shape);
        let shape = shaped.then_some(self.shape.as_str());
        if let Some(known) = shape.and_then(|shape| self.by_shape.get(shape)) {
            return Arc::clone(known);
        }
        if let Some((known, by_shape)) = shared.known(sql, shape) {
            if by_shape {
                self.by_shape
                    .remember(&self.shape, &known, Self::TEXT_BYTES);
            } else {
                self.by_text.remember(sql, &known, Self::TEXT_BYTES);
            }
            return known;
        }
        let (classified, by_shape) = self.parsed(sql, shaped, first_seen);
        shared.remember(sql, by_shape.then_some(self.shape.as_str()), &classified);
        classified
    }

    /// The parser's classification of `sql` (found by its fingerprint when this session
    /// has met the fingerprint), remembered; and whether its shape (`self.shape`, when
    /// `shaped`) now stands for it.
    fn parsed(
        &mut self,
        sql: &str,
        shaped: bool,
        first_seen: impl FnOnce(u64),
    ) -> (Arc<Classified>, bool) {
        let hinted = hint(sql);
        let fingerprint = match hinted {
            None => pg_query::fingerprint(sql, 0, 0).ok().map(|f| f.value),
            Some(_) => None,
        };
        if let Some(known) = fingerprint.and_then(|f| self.by_fingerprint.get(&f)) {
            let known = Arc::clone(known);
            if shaped {
                self.by_shape
                    .remember(&self.shape, &known, Self::TEXT_BYTES);
            }
            return (known, shaped);
        }
        let mut by_shape = false;
        let classified = if hinted == Some(Hint::Primary) {
            Arc::new(Classified::primary())
        } else {
            let (mut classified, shape_decides) = classify_parsed(sql, hinted);
            if classified.is_read() {
                classified.fingerprint =
                    fingerprint.or_else(|| pg_query::fingerprint(sql, 0, 0).ok().map(|f| f.value));
            }
            let classified = Arc::new(classified);
            if let (true, Some(fingerprint)) = (shape_decides, fingerprint) {
                remember(&mut self.by_fingerprint, fingerprint, &classified);
                if shaped {
                    self.by_shape
                        .remember(&self.shape, &classified, Self::TEXT_BYTES);
                    by_shape = true;
                }
            }
            classified
        };
        if let Some(fingerprint) = classified.fingerprint {
            first_seen(fingerprint);
        }
        self.by_text.remember(sql, &classified, Self::TEXT_BYTES);
        (classified, by_shape)
    }
}

/// Classifications every session shares, so that a new session (an application that
/// connects per request) looks up what another session has classified instead of
/// parsing it again, which costs about 1.5 million instructions for a short SELECT. A
/// session asks only when its own [`Cache`] misses: the lock is taken once per statement
/// per session, not per query. Its maps are seeded at random (foldhash) and start over
/// when full, like a session's, with a larger budget of text ([`SharedCache::TEXT_BYTES`]).
#[derive(Debug, Default)]
pub struct SharedCache {
    maps: Mutex<SharedMaps>,
}

#[derive(Debug, Default)]
struct SharedMaps {
    by_text: Texts,
    by_shape: Texts,
}

impl SharedCache {
    /// The bytes of text each of its maps keeps at most.
    const TEXT_BYTES: usize = 4 << 20;

    /// `sql`'s classification by its text, or by its `shape`; and whether by shape.
    fn known(&self, sql: &str, shape: Option<&str>) -> Option<(Arc<Classified>, bool)> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = maps.by_text.get(sql) {
            return Some((Arc::clone(known), false));
        }
        let known = maps.by_shape.get(shape?)?;
        Some((Arc::clone(known), true))
    }

    /// A session parsed `sql`; `shape` when the shape stands for it.
    fn remember(&self, sql: &str, shape: Option<&str>, classified: &Arc<Classified>) {
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.by_text.remember(sql, classified, Self::TEXT_BYTES);
        if let Some(shape) = shape {
            maps.by_shape.remember(shape, classified, Self::TEXT_BYTES);
        }
    }
}

fn remember<K: std::hash::Hash + Eq>(map: &mut Map<K>, key: K, classified: &Arc<Classified>) {
    if map.len() >= Cache::ENTRIES {
        map.clear();
    }
    map.insert(key, Arc::clone(classified));
}

/// Classifications by text (or by shape), bounded in entries and in the bytes of text
/// they keep: a client's long distinct texts (an IN list of every length) must not pile
/// up, in a session or across them.
#[derive(Debug, Default)]
struct Texts {
    map: Map<Box<str>>,
    text_bytes: usize,
}

impl Texts {
    fn get(&self, text: &str) -> Option<&Arc<Classified>> {
        self.map.get(text)
    }

    /// Keeps `text`'s classification, starting over when `max_bytes` (or
    /// [`Cache::ENTRIES`]) would be passed; a text over a sixteenth of `max_bytes` is not
    /// kept, so that one long text cannot empty the map every time it comes.
    fn remember(&mut self, text: &str, classified: &Arc<Classified>, max_bytes: usize) {
        if text.len() > max_bytes / 16 {
            return;
        }
        if self.map.len() >= Cache::ENTRIES || self.text_bytes + text.len() > max_bytes {
            self.map.clear();
            self.text_bytes = 0;
        }
        if self
            .map
            .insert(text.into(), Arc::clone(classified))
            .is_none()
        {
            self.text_bytes += text.len();
        }
    }
}

/// The query as the audit shows it: constants replaced by `$1`, `$2`, ... (a query that
/// cannot be normalized is shown as given).
pub fn normalized(sql: &str) -> String {
    pg_query::normalize(sql).unwrap_or_else(|_| sql.to_owned())
}

/// The source text of one statement of a multi-statement string.
fn statement_text<'a>(sql: &'a str, raw: &protobuf::RawStmt) -> &'a str {
    let start = usize::try_from(raw.stmt_location).unwrap_or(0);
    let text = sql.get(start..).unwrap_or(sql);
    match usize::try_from(raw.stmt_len) {
        Ok(len) if len > 0 => text.get(..len).unwrap_or(text),
        _ => text,
    }
    .trim()
}

/// What one statement is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// Changes session state only (SET, DISCARD, LISTEN, PREPARE, ...): the primary, and
    /// no write to wait for.
    Session,
    Write,
}

impl From<Route> for Kind {
    fn from(route: Route) -> Self {
        match route {
            Route::Read => Kind::Read,
            Route::Primary => Kind::Write,
        }
    }
}

/// One statement's kind; session commands are noted in `classified` as they are met.
fn statement(node: &NodeEnum, text: &str, classified: &mut Classified) -> Kind {
    match node {
        NodeEnum::SelectStmt(select) => {
            if let Some(into) = &select.into_clause {
                note_temp(into.rel.as_ref(), classified);
            }
            let Ok(tree) = serde_json::to_value(node) else {
                return Kind::Write;
            };
            if tree_is_read_only(&tree) {
                return Kind::Read;
            }
            note_set_configs(&tree, classified);
            Kind::Write
        }
        NodeEnum::ExplainStmt(explain) => {
            match explain.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(query @ NodeEnum::SelectStmt(_)) => query_route(query).into(),
                _ => Kind::Write,
            }
        }
        NodeEnum::TransactionStmt(transaction) => match transaction_route(transaction) {
            Route::Read => {
                use protobuf::TransactionStmtKind as Begin;
                classified.begins_read_only |= matches!(
                    Begin::try_from(transaction.kind),
                    Ok(Begin::TransStmtBegin | Begin::TransStmtStart)
                );
                Kind::Read
            }
            // A read-write transaction's writes count when it commits.
            Route::Primary => Kind::Session,
        },
        NodeEnum::VariableSetStmt(set) => {
            note_set(set, text, classified);
            Kind::Session
        }
        NodeEnum::DiscardStmt(discard) => {
            use protobuf::DiscardMode;
            let all = discard.target == DiscardMode::DiscardAll as i32;
            if all {
                classified.session_sets.push(SessionSet {
                    isolation: IsolationChange::Reset,
                    ..SessionSet::new(None, text.to_owned())
                });
                classified.deallocates_all = true;
            }
            classified.discards_temp |= all || discard.target == DiscardMode::DiscardTemp as i32;
            Kind::Session
        }
        NodeEnum::CreateStmt(create) => {
            note_temp(create.relation.as_ref(), classified);
            Kind::Write
        }
        NodeEnum::CreateTableAsStmt(create) => {
            note_temp(
                create.into.as_ref().and_then(|into| into.rel.as_ref()),
                classified,
            );
            Kind::Write
        }
        NodeEnum::ViewStmt(view) => {
            note_temp(view.view.as_ref(), classified);
            Kind::Write
        }
        NodeEnum::CreateSeqStmt(sequence) => {
            note_temp(sequence.sequence.as_ref(), classified);
            Kind::Write
        }
        NodeEnum::DeallocateStmt(deallocate) => {
            if deallocate.isall {
                classified.deallocates_all = true;
            } else {
                classified.deallocates.push(deallocate.name.clone());
            }
            Kind::Session
        }
        NodeEnum::VariableShowStmt(_)
        | NodeEnum::ListenStmt(_)
        | NodeEnum::UnlistenStmt(_)
        | NodeEnum::PrepareStmt(_) => Kind::Session,
        _ => Kind::Write,
    }
}

/// Notes a relation a statement creates if it is temporary (`TEMP`, or made in `pg_temp`).
fn note_temp(relation: Option<&protobuf::RangeVar>, classified: &mut Classified) {
    if let Some(relation) = relation
        && (relation.relpersistence == "t" || relation.schemaname == "pg_temp")
    {
        classified.temp_creates.push(relation.relname.clone());
    }
}

/// The relations a statement names, without their schemas: the fingerprint, which shares a
/// verdict between texts, keeps a relation's name but not its schema (`t`, `public.t` and
/// `pg_temp.t` have one fingerprint), so nothing that is shared may depend on the schema.
fn relation_names(parsed: &pg_query::ParseResult) -> Vec<String> {
    let mut names: Vec<String> = parsed
        .tables()
        .into_iter()
        .map(|table| match table.rsplit_once('.') {
            Some((_, name)) => name.to_owned(),
            None => table,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

impl Classified {
    /// Whether this read may read one of the session's `temporary` relations: it names a
    /// relation called like one, in any schema (unqualified, the temporary one comes first
    /// in the search path; qualified, `pg_temp.t` or `public.t`, it costs at most a trip to
    /// the primary), or it begins a read-only transaction, whose reads follow it.
    #[inline]
    pub fn reads_any_of(&self, temporary: &[String]) -> bool {
        !temporary.is_empty()
            && (self.begins_read_only
                || self
                    .relations
                    .iter()
                    .any(|relation| temporary.contains(relation)))
    }
}

/// BEGIN READ ONLY (the whole transaction may run on a replica), COMMIT and ROLLBACK are
/// reads; any other BEGIN, savepoints and two-phase commands are not.
fn transaction_route(transaction: &protobuf::TransactionStmt) -> Route {
    use protobuf::TransactionStmtKind as Kind;
    match Kind::try_from(transaction.kind) {
        // A standby cannot run a serializable transaction, read-only or not.
        Ok(Kind::TransStmtBegin | Kind::TransStmtStart)
            if read_only(&transaction.options)
                && isolation_option(&transaction.options).as_deref() != Some("serializable") =>
        {
            Route::Read
        }
        Ok(Kind::TransStmtCommit | Kind::TransStmtRollback) => Route::Read,
        _ => Route::Primary,
    }
}

/// Whether transaction options include READ ONLY (`transaction_read_only = true`).
fn read_only(options: &[protobuf::Node]) -> bool {
    matches!(
        transaction_option(options, "transaction_read_only"),
        Some(protobuf::a_const::Val::Ival(protobuf::Integer { ival: 1 }))
    )
}

/// The isolation level among BEGIN's or SET SESSION CHARACTERISTICS' options, lowercased.
fn isolation_option(options: &[protobuf::Node]) -> Option<String> {
    match transaction_option(options, "transaction_isolation")? {
        protobuf::a_const::Val::Sval(level) => Some(level.sval.to_ascii_lowercase()),
        _ => None,
    }
}

/// The constant value of the transaction option `name` (a DefElem of BEGIN's or SET
/// SESSION CHARACTERISTICS' options).
fn transaction_option<'tree>(
    options: &'tree [protobuf::Node],
    name: &str,
) -> Option<&'tree protobuf::a_const::Val> {
    options
        .iter()
        .find_map(|option| match option.node.as_ref()? {
            NodeEnum::DefElem(element) if element.defname == name => {
                match element.arg.as_ref()?.node.as_ref()? {
                    NodeEnum::AConst(constant) => constant.val.as_ref(),
                    _ => None,
                }
            }
            _ => None,
        })
}

/// Notes a SET or RESET for replay on the replica. SET LOCAL and SET TRANSACTION last only
/// for the transaction, which runs on one backend, so they are not replayed.
fn note_set(set: &protobuf::VariableSetStmt, text: &str, classified: &mut Classified) {
    use protobuf::VariableSetKind as Kind;
    if set.is_local {
        return;
    }
    let variable = set.name.to_ascii_lowercase();
    let (variable, isolation) = match Kind::try_from(set.kind) {
        Ok(Kind::VarResetAll) => (None, IsolationChange::Reset),
        Ok(Kind::VarSetMulti) if set.name == "TRANSACTION" => return,
        // SET SESSION CHARACTERISTICS AS TRANSACTION ...
        Ok(Kind::VarSetMulti) => {
            let isolation = isolation_option(&set.args);
            let change = isolation.map_or(IsolationChange::Unchanged, |level| {
                IsolationChange::to(&level)
            });
            (Some(variable), change)
        }
        Ok(Kind::VarSetValue) if variable == "default_transaction_isolation" => {
            let level = set_value(&set.args).unwrap_or_default();
            (Some(variable), IsolationChange::to(&level))
        }
        Ok(Kind::VarReset | Kind::VarSetDefault) if variable == "default_transaction_isolation" => {
            (Some(variable), IsolationChange::Reset)
        }
        Ok(_) => (Some(variable), IsolationChange::Unchanged),
        Err(_) => return,
    };
    classified.session_sets.push(SessionSet {
        isolation,
        ..SessionSet::new(variable, text.to_owned())
    });
}

/// Notes every session-level `set_config(name, value, false)` in a query's tree for replay
/// on the replica, as SET is: at once when its arguments are constants, at each Bind when
/// some are parameters. One with other expressions cannot be replayed (the README says to
/// use SET there).
fn note_set_configs(value: &Value, classified: &mut Classified) {
    match value {
        Value::Array(items) => items
            .iter()
            .for_each(|item| note_set_configs(item, classified)),
        Value::Object(fields) => {
            for (key, child) in fields {
                if key == "FuncCall"
                    && function_name(child).is_some_and(|name| is_set_config(&name))
                    && let Some(call) = SetConfig::of(child)
                {
                    if call.has_parameters() {
                        classified.bound_set_configs.push(call);
                    } else {
                        classified.session_sets.extend(call.session_set(None));
                    }
                }
                note_set_configs(child, classified);
            }
        }
        _ => {}
    }
}

fn is_set_config(qualified: &[&str]) -> bool {
    matches!(qualified, ["set_config"] | ["pg_catalog", "set_config"])
}

/// One argument of a set_config call: a constant, or the Bind parameter `$n` (`n - 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Argument {
    Text(String),
    Bool(bool),
    Parameter(usize),
}

impl Argument {
    /// A constant or a parameter, bare or cast (`'x'`, `'x'::text`, `false`, `$1`); `None`
    /// for anything else.
    fn of(argument: &Value) -> Option<Self> {
        let mut node = argument.get("node")?;
        if let Some(cast) = node.get("TypeCast") {
            node = cast.pointer("/arg/node")?;
        }
        if let Some(number) = node.pointer("/ParamRef/number").and_then(Value::as_u64) {
            return Some(Argument::Parameter(
                usize::try_from(number).ok()?.checked_sub(1)?,
            ));
        }
        let value = node.pointer("/AConst/val")?;
        if let Some(text) = value.pointer("/Sval/sval").and_then(Value::as_str) {
            return Some(Argument::Text(text.to_owned()));
        }
        let flag = value.pointer("/Boolval/boolval")?;
        Some(Argument::Bool(flag.as_bool().unwrap_or(false)))
    }

    fn text(&self, bound: Option<&BoundParameters>) -> Option<String> {
        match self {
            Argument::Text(text) => Some(text.clone()),
            Argument::Bool(_) => None,
            Argument::Parameter(index) => bound?.text(*index),
        }
    }

    fn flag(&self, bound: Option<&BoundParameters>) -> Option<bool> {
        match self {
            Argument::Text(text) => boolean_text(text),
            Argument::Bool(flag) => Some(*flag),
            Argument::Parameter(index) => bound?.flag(*index),
        }
    }
}

/// A `set_config(name, value, is_local)` call whose arguments are constants or Bind
/// parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfig {
    name: Argument,
    value: Argument,
    is_local: Argument,
}

impl SetConfig {
    fn of(call: &Value) -> Option<Self> {
        let [name, value, is_local] = call.get("args")?.as_array()?.as_slice() else {
            return None;
        };
        Some(SetConfig {
            name: Argument::of(name)?,
            value: Argument::of(value)?,
            is_local: Argument::of(is_local)?,
        })
    }

    fn has_parameters(&self) -> bool {
        [&self.name, &self.value, &self.is_local]
            .iter()
            .any(|argument| matches!(argument, Argument::Parameter(_)))
    }

    /// What to replay on the replica, with the values of the Bind that ran it: nothing for
    /// a transaction-local call (it lasts only for the transaction, on one backend) or one
    /// whose values cannot be read (NULL, a format this does not know).
    pub fn session_set(&self, bound: Option<&BoundParameters>) -> Option<SessionSet> {
        if self.is_local.flag(bound)? {
            return None;
        }
        let (name, value) = (self.name.text(bound)?, self.value.text(bound)?);
        let variable = name.to_ascii_lowercase();
        let isolation = if variable == "default_transaction_isolation" {
            IsolationChange::to(&value)
        } else {
            IsolationChange::Unchanged
        };
        Some(SessionSet {
            isolation,
            ..SessionSet::new(Some(variable), session_sql::set_config(&name, &value))
        })
    }
}

/// `SET lagprobe.x = ...`, `RESET lagprobe.x` or `SHOW lagprobe.x`.
fn proxy_command(node: &NodeEnum) -> Option<ProxyCommand> {
    use protobuf::VariableSetKind as Kind;
    match node {
        NodeEnum::VariableSetStmt(set) => {
            let name = set.name.strip_prefix("lagprobe.")?.to_owned();
            let value = match Kind::try_from(set.kind) {
                Ok(Kind::VarSetValue) => Some(set_value(&set.args)?),
                Ok(Kind::VarReset | Kind::VarSetDefault) => None,
                _ => return None,
            };
            Some(ProxyCommand::Set { name, value })
        }
        NodeEnum::VariableShowStmt(show) => Some(ProxyCommand::Show {
            name: show.name.strip_prefix("lagprobe.")?.to_owned(),
        }),
        _ => None,
    }
}

/// The one value of a SET, as text (`'lsn-wait'`, `lsn_wait` or `0`).
fn set_value(args: &[protobuf::Node]) -> Option<String> {
    let [arg] = args else { return None };
    match arg.node.as_ref()? {
        NodeEnum::AConst(constant) => match constant.val.as_ref()? {
            protobuf::a_const::Val::Sval(text) => Some(text.sval.clone()),
            protobuf::a_const::Val::Ival(int) => Some(int.ival.to_string()),
            protobuf::a_const::Val::Fval(float) => Some(float.fval.clone()),
            protobuf::a_const::Val::Boolval(boolean) => Some(boolean.boolval.to_string()),
            protobuf::a_const::Val::Bsval(bits) => Some(bits.bsval.clone()),
        },
        _ => None,
    }
}

/// A query is a read when nothing anywhere in its tree may write: the tree is walked whole
/// (through its serde form), so a function call hidden in a LIMIT, a VALUES list or a
/// window clause is found as surely as one in the target list.
fn query_route(node: &NodeEnum) -> Route {
    match serde_json::to_value(node) {
        Ok(tree) if tree_is_read_only(&tree) => Route::Read,
        _ => Route::Primary,
    }
}

fn tree_is_read_only(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().all(tree_is_read_only),
        Value::Object(fields) => fields.iter().all(|(key, child)| match key.as_str() {
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => false,
            "locking_clause" | "into_clause" if !is_empty(child) => false,
            "FuncCall" => function_call_is_safe(child) && tree_is_read_only(child),
            _ => tree_is_read_only(child),
        }),
        _ => true,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn function_call_is_safe(call: &Value) -> bool {
    function_name(call).is_some_and(|names| function_is_safe(&names))
}

/// A FuncCall's `funcname`: a list of String nodes (`pg_catalog`, `now`).
fn function_name(call: &Value) -> Option<Vec<&str>> {
    call.get("funcname")?
        .as_array()?
        .iter()
        .map(|part| part.pointer("/node/String/sval").and_then(Value::as_str))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(sql: &str) -> Route {
        classify(sql).route
    }

    #[test]
    fn the_cache_shares_a_verdict_only_where_the_fingerprint_decides_it() {
        let (mut cache, shared) = (Cache::default(), SharedCache::default());
        let mut admitted = Vec::new();
        let mut classify = |sql: &str| cache.classify(sql, &shared, |f| admitted.push(f));
        let first = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
        let other_constant = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 2");
        assert_eq!(first.route, Route::Read);
        assert!(Arc::ptr_eq(&first, &other_constant), "one parse for both");
        // Same shape, but a function that may write: not the cached read.
        assert_eq!(classify("SELECT nextval('s')").route, Route::Primary);
        assert_eq!(classify("SELECT now()").route, Route::Read);
        // Constants that decide: BEGIN READ ONLY / READ WRITE, SET's value.
        assert_eq!(classify("BEGIN READ ONLY").route, Route::Read);
        assert_eq!(classify("BEGIN READ WRITE").route, Route::Primary);
        assert_eq!(
            classify("SET timezone = 'UTC'").session_sets[0].text,
            "SET timezone = 'UTC'"
        );
        let later = classify("SET timezone = 'Europe/Paris'");
        assert_eq!(later.session_sets[0].text, "SET timezone = 'Europe/Paris'");
        // One shape, but the SET's own text is replayed: each keeps its own.
        for ms in [1000, 2000] {
            let sql = format!("SET statement_timeout = {ms}");
            assert_eq!(classify(&sql).session_sets[0].text, sql);
        }
        // One shape, and set_config's value is replayed: each keeps its own.
        for zone in ["UTC", "Asia/Tokyo"] {
            let sql = format!("SELECT set_config('timezone', '{zone}', false)");
            let replay = format!("SELECT pg_catalog.set_config(E'timezone', E'{zone}', false)");
            assert_eq!(classify(&sql).session_sets[0].text, replay);
        }
        // A shape met first through the fingerprint path shares that verdict too.
        let quoted = classify(r#"SELECT "x" FROM "t" WHERE "id" = 'a'"#);
        let same_shape = classify(r#"SELECT "x" FROM "t" WHERE "id" = 'b'"#);
        assert!(Arc::ptr_eq(&quoted, &same_shape));
        // A hint is not in the fingerprint: the hinted verdict stays with its text.
        let hinted = classify("/* lagprobe:replica */ SELECT nextval('t')");
        assert_eq!(hinted.route, Route::Read);
        assert_eq!(classify("SELECT nextval('t')").route, Route::Primary);
        assert_eq!(
            classify("/* lagprobe:primary */ SELECT 1").route,
            Route::Primary
        );
        assert_eq!(classify("SELECT 1").route, Route::Read);
        assert!(classify("SELECT FROM WHERE").route == Route::Primary);
        let show = classify("SHOW lagprobe.strategy");
        assert!(show.command.is_some() && show.fingerprint.is_none());
        // The audit hears of each read fingerprint once.
        let mut sorted = admitted.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), admitted.len(), "{admitted:?}");
    }

    #[test]
    fn a_new_session_finds_what_another_classified_without_parsing_it() {
        let shared = SharedCache::default();
        let parsed_by = |cache: &mut Cache, sql: &str| {
            let mut parsed = false;
            let classified = cache.classify(sql, &shared, |_| parsed = true);
            (classified, parsed)
        };
        let (mut first_session, mut second_session) = (Cache::default(), Cache::default());
        let text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let (first, parsed) = parsed_by(&mut first_session, text);
        assert!(parsed, "the first session parses");
        let (second, parsed) = parsed_by(&mut second_session, text);
        assert!(
            !parsed && Arc::ptr_eq(&first, &second),
            "the second looks it up"
        );
        // By shape too: other constants, the same verdict, still no parse.
        let (one, _) = parsed_by(&mut first_session, "SELECT x FROM t WHERE id = 1");
        let (two, parsed) = parsed_by(&mut second_session, "SELECT x FROM t WHERE id = 2");
        assert!(!parsed && Arc::ptr_eq(&one, &two));
        // What only its text decides is shared by its text alone.
        let (read_only, _) = parsed_by(&mut first_session, "BEGIN READ ONLY");
        let (again, _) = parsed_by(&mut second_session, "BEGIN READ ONLY");
        assert!(Arc::ptr_eq(&read_only, &again));
        let (read_write, _) = parsed_by(&mut second_session, "BEGIN READ WRITE");
        assert_eq!(
            (read_only.route, read_write.route),
            (Route::Read, Route::Primary)
        );
        // A text too long to keep is parsed by each session.
        let padding = "x".repeat(SharedCache::TEXT_BYTES / 16);
        let long = format!("SELECT 1 /* {padding} */");
        let (long_first, _) = parsed_by(&mut first_session, &long);
        let (long_second, _) = parsed_by(&mut second_session, &long);
        assert!(!Arc::ptr_eq(&long_first, &long_second));
    }

    #[test]
    fn long_distinct_texts_do_not_pile_up_in_a_session() {
        let (mut cache, shared) = (Cache::default(), SharedCache::default());
        let padding = "x".repeat(1000);
        for alias in 0..300 {
            // An alias is not a constant: every text is a statement of its own.
            let sql = format!("SELECT 1 AS c{alias} /* {padding} */");
            assert_eq!(cache.classify(&sql, &shared, |_| {}).route, Route::Read);
        }
        for texts in [&cache.by_text, &cache.by_shape] {
            let kept: usize = texts.map.keys().map(|text| text.len()).sum();
            assert_eq!(kept, texts.text_bytes);
            assert!(kept <= Cache::TEXT_BYTES, "{kept} bytes kept");
        }
        let kept = cache.by_text.map.len();
        assert!(kept > 0 && kept < 300, "{kept} texts kept");
        // The shared cache, with more room, kept them all.
        let shared = shared.maps.lock().unwrap();
        assert_eq!(shared.by_text.map.len(), 300);
    }

    #[test]
    fn plain_queries_are_reads() {
        for sql in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = $1",
            "SELECT count(*) FROM t JOIN u USING (id) WHERE t.x > now() - interval '1 day'",
            "VALUES (1), (2)",
            "TABLE t",
            "SELECT pg_is_in_recovery(), current_setting('TimeZone')",
            "EXPLAIN SELECT * FROM t",
            "SELECT 1; SELECT 2",
            "WITH x AS (SELECT 1) SELECT * FROM x",
        ] {
            assert_eq!(route(sql), Route::Read, "{sql}");
        }
    }

    #[test]
    fn anything_that_may_write_goes_to_the_primary() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            "SELECT nextval('s')",
            "SELECT 1 LIMIT nextval('s')",
            "VALUES (setval('s', 1))",
            "SELECT my_function()",
            "SELECT 1 FOR UPDATE",
            "SELECT * FROM (SELECT * FROM t FOR SHARE) AS locked",
            "SELECT * INTO new_table FROM t",
            "CREATE TABLE t (x int)",
            "SELECT 1; INSERT INTO t VALUES (1)",
            "BEGIN",
            "LISTEN channel",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "SHOW timezone",
            "COPY t TO STDOUT",
            "this is not sql",
            "LOCK TABLE t",
        ] {
            assert_eq!(route(sql), Route::Primary, "{sql}");
        }
    }

    #[test]
    fn read_only_transactions_are_reads() {
        assert_eq!(route("BEGIN READ ONLY"), Route::Read);
        assert_eq!(
            route("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            Route::Read
        );
        // A standby refuses serializable transactions.
        assert_eq!(
            route("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"),
            Route::Primary
        );
        assert_eq!(route("BEGIN READ WRITE"), Route::Primary);
        assert_eq!(route("COMMIT"), Route::Read);
    }

    #[test]
    fn session_settings_are_noted_for_replay() {
        let set = classify("SET timezone = 'Asia/Tokyo'");
        assert_eq!(set.route, Route::Primary);
        assert!(!set.writes);
        assert!(classify("INSERT INTO t VALUES (1)").writes);
        assert!(!classify("SELECT 1").writes);
        assert!(classify("SELECT nextval('s')").writes);
        assert_eq!(
            set.session_sets,
            vec![SessionSet::new(
                Some("timezone".into()),
                "SET timezone = 'Asia/Tokyo'".into()
            )]
        );
        let several = classify("SET search_path TO a; SELECT 1; RESET ALL");
        assert_eq!(several.session_sets.len(), 2);
        assert_eq!(several.session_sets[0].text, "SET search_path TO a");
        assert_eq!(several.session_sets[1].variable, None);
        assert_eq!(several.session_sets[1].text, "RESET ALL");
        assert!(
            classify("SET LOCAL timezone = 'UTC'")
                .session_sets
                .is_empty()
        );
        assert!(
            classify("SET TRANSACTION READ ONLY")
                .session_sets
                .is_empty()
        );
        let discard = classify("DISCARD ALL");
        assert!(discard.deallocates_all);
        assert_eq!(classify("DEALLOCATE p").deallocates, vec!["p".to_owned()]);
    }

    #[test]
    fn session_level_set_configs_are_noted_for_replay_with_their_values() {
        let empty_path = classify("SELECT pg_catalog.set_config('search_path', '', false)");
        assert_eq!(empty_path.route, Route::Primary);
        assert_eq!(
            empty_path.session_sets,
            vec![SessionSet::new(
                Some("search_path".into()),
                "SELECT pg_catalog.set_config(E'search_path', E'', false)".into()
            )]
        );
        // Quotes and backslashes survive, whatever standard_conforming_strings says.
        let quoted = classify(r"SELECT set_config('Application_Name', 'it''s \ x', 'off')");
        assert_eq!(
            quoted.session_sets,
            vec![SessionSet::new(
                Some("application_name".into()),
                r"SELECT pg_catalog.set_config(E'Application_Name', E'it''s \\ x', false)".into()
            )]
        );
        let cast = classify("SELECT set_config('a.b'::text, 'c'::text, false::boolean)");
        assert_eq!(cast.session_sets[0].variable.as_deref(), Some("a.b"));
        let two = classify("SELECT set_config('a.x', '1', false), set_config('a.y', '2', false)");
        assert_eq!(two.session_sets.len(), 2);
        for not_replayed in [
            "SELECT set_config('search_path', 'a', true)",
            "SELECT set_config('search_path', $1, false)",
            "SELECT set_config('search_path', current_user, false)",
            "SELECT set_config('a.b', 'c', $1)",
            "SELECT my_schema.set_config('a.b', 'c', false)",
        ] {
            let classified = classify(not_replayed);
            assert!(classified.session_sets.is_empty(), "{not_replayed}");
            assert_eq!(classified.route, Route::Primary, "{not_replayed}");
        }
    }

    #[test]
    fn temporary_relations_are_noted_and_their_schema_is_the_primarys() {
        for (sql, created) in [
            ("CREATE TEMP TABLE scratch (x int)", "scratch"),
            ("CREATE TEMPORARY VIEW v AS SELECT 1", "v"),
            ("CREATE TABLE pg_temp.t (x int)", "t"),
            ("CREATE TEMP TABLE t3 AS SELECT 1", "t3"),
            ("SELECT 1 AS x INTO TEMP t4", "t4"),
            ("CREATE TEMP SEQUENCE s", "s"),
        ] {
            let classified = classify(sql);
            assert_eq!(classified.temp_creates, [created], "{sql}");
            assert_eq!(classified.route, Route::Primary, "{sql}");
        }
        assert!(
            classify("CREATE TABLE kept (x int)")
                .temp_creates
                .is_empty()
        );
        assert!(classify("DISCARD TEMP").discards_temp);
        assert!(classify("DISCARD ALL").discards_temp);
        assert!(!classify("DISCARD PLANS").discards_temp);

        let read = classify("SELECT * FROM scratch JOIN public.kept USING (x)");
        assert_eq!(read.route, Route::Read);
        assert_eq!(read.relations, ["kept", "scratch"]);
        let temporary = ["scratch".to_owned()];
        assert!(read.reads_any_of(&temporary));
        assert!(!read.reads_any_of(&[]));
        assert!(classify("SELECT * FROM pg_temp.scratch").reads_any_of(&temporary));
        assert!(!classify("SELECT * FROM other").reads_any_of(&temporary));
        // A read-only transaction may read them later: it runs where they are.
        assert!(classify("BEGIN READ ONLY").reads_any_of(&temporary));
        assert!(!classify("BEGIN READ ONLY").reads_any_of(&[]));
        assert!(!classify("COMMIT").reads_any_of(&temporary));
    }

    #[test]
    fn serializable_transactions_and_sessions_are_told_apart() {
        assert_eq!(
            route("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"),
            Route::Primary
        );
        assert_eq!(
            route("START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE READ"),
            Route::Read
        );
        use IsolationChange::*;
        let serializable = |sql: &str| classify(sql).session_sets[0].isolation;
        assert_eq!(
            serializable("SET default_transaction_isolation = 'serializable'"),
            Serializable
        );
        assert_eq!(
            serializable("SET default_transaction_isolation TO 'read committed'"),
            NotSerializable
        );
        assert_eq!(
            serializable("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Serializable
        );
        assert_eq!(
            serializable("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Unchanged
        );
        assert_eq!(serializable("RESET default_transaction_isolation"), Reset);
        assert_eq!(serializable("RESET ALL"), Reset);
        assert_eq!(
            serializable(
                "SELECT set_config('default_transaction_isolation', 'SERIALIZABLE', false)"
            ),
            Serializable
        );
        assert_eq!(serializable("SET timezone = 'UTC'"), Unchanged);
    }

    /// What `call` replays with a Bind of these text-format values.
    fn replayed(call: &SetConfig, values: Vec<Option<&str>>) -> Option<SessionSet> {
        use crate::proxy::wire::{BoundParameters, tests::bind_frame};
        let frame = bind_frame(vec![], values);
        call.session_set(Some(&BoundParameters::of(&frame).unwrap()))
    }

    #[test]
    fn set_configs_with_parameters_are_replayed_with_each_binds_values() {
        let classified = classify("SELECT set_config($1, $2::text, false)");
        assert!(classified.session_sets.is_empty());
        let [call] = classified.bound_set_configs.as_slice() else {
            panic!("{classified:?}");
        };
        let set = replayed(call, vec![Some("App.Tenant"), Some("42")]).unwrap();
        assert_eq!(set.variable.as_deref(), Some("app.tenant"));
        assert_eq!(
            set.text,
            "SELECT pg_catalog.set_config(E'App.Tenant', E'42', false)"
        );
        assert_eq!(replayed(call, vec![Some("a.b"), None]), None, "NULL");

        let local = classify("SELECT set_config('a.b', $1, $2)");
        let [call] = local.bound_set_configs.as_slice() else {
            panic!("{local:?}");
        };
        assert!(replayed(call, vec![Some("v"), Some("false")]).is_some());
        assert_eq!(replayed(call, vec![Some("v"), Some("true")]), None);
        // The template keeps its constants: not shared with another variable's text.
        let mut cache = Cache::default();
        let shared = SharedCache::default();
        for variable in ["a.x", "a.y"] {
            let sql = format!("SELECT set_config('{variable}', $1, false)");
            let classified = cache.classify(&sql, &shared, |_| {});
            let set = replayed(&classified.bound_set_configs[0], vec![Some("1")]).unwrap();
            assert_eq!(set.variable.as_deref(), Some(variable));
        }
    }

    #[test]
    fn hints_override_the_parser() {
        assert_eq!(route("/* lagprobe:primary */ SELECT 1"), Route::Primary);
        assert_eq!(
            route("/* lagprobe:replica */ SELECT my_read_only_function()"),
            Route::Read
        );
        assert_eq!(route("  /* lagprobe:replica */ SHOW timezone"), Route::Read);
        assert_eq!(route("/* other */ SELECT nextval('s')"), Route::Primary);
        assert_eq!(hint("/* lagprobe:replica"), None);
    }

    #[test]
    fn lagprobe_commands_are_recognised() {
        assert_eq!(
            classify("SET lagprobe.strategy = 'lsn-wait'").command,
            Some(ProxyCommand::Set {
                name: "strategy".into(),
                value: Some("lsn-wait".into())
            })
        );
        assert_eq!(
            classify("set lagprobe.min_lsn to '0/3000148'").command,
            Some(ProxyCommand::Set {
                name: "min_lsn".into(),
                value: Some("0/3000148".into())
            })
        );
        assert_eq!(
            classify("SHOW lagprobe.last_commit_lsn").command,
            Some(ProxyCommand::Show {
                name: "last_commit_lsn".into()
            })
        );
        assert_eq!(
            classify("SET lagprobe.strategy = 'x'; SELECT 1").command,
            None
        );
        assert_eq!(classify("SHOW timezone").command, None);
    }
}
