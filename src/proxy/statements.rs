//! Named prepared statements across two backends, transparently: the client prepares a
//! statement once, and whichever backend executes it gets it prepared first.
//!
//! The proxy remembers each statement's Parse message and which version of it each backend
//! has. Before a batch runs on a backend, the statements it uses that the backend lacks (or
//! has in an older version) are prepared there: a Close then a Parse at the front of the
//! batch, whose CloseComplete and ParseComplete the proxy swallows. Close of a statement
//! that does not exist is not an error, so an uncertain state (after a failed batch) is
//! repaired the same way.
//!
//! Every Bind passes through here, so a batch of known statements costs no allocation:
//! names are shared (`Arc<str>`, the map's own key) and the maps hash with foldhash, not
//! SipHash. A client can only slow its own session's maps, so DoS-resistant hashing buys
//! nothing here.

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};

use super::{Target, classify::Classified};

/// A statement name, shared between the maps and the batches that use it.
pub type Name = Arc<str>;

type Map<V> = HashMap<Name, V, foldhash::fast::RandomState>;

/// How one message of a batch uses a prepared statement (owned, so a batch can be planned
/// again for another backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementUse {
    /// A Parse, with the version [`Statements::define`] gave it.
    Parse {
        name: Name,
        version: u64,
    },
    /// A Bind, or a Describe of the statement.
    Use {
        name: Name,
    },
    Close {
        name: Name,
    },
}

impl StatementUse {
    fn name(&self) -> &str {
        match self {
            StatementUse::Parse { name, .. }
            | StatementUse::Use { name }
            | StatementUse::Close { name } => name,
        }
    }
}

/// A statement as the client last prepared it.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The map's key, shared.
    name: Name,
    pub parse: Bytes,
    pub classified: Arc<Classified>,
    version: u64,
}

/// A backend holds a statement of this version; `UNKNOWN` after a failed batch.
const UNKNOWN: u64 = u64::MAX;

#[derive(Debug, Default)]
pub struct Statements {
    defined: Map<Statement>,
    /// Per backend ([`Target::index`]): statement name -> version prepared there.
    prepared: [Map<u64>; 2],
    next_version: u64,
    /// Scratch for [`Statements::plan`]: where each name first appears in the batch, kept
    /// for its allocation. A pipelined batch may bind one statement a thousand times, so
    /// earlier uses are compared per distinct name, not per message.
    first_uses: Vec<usize>,
}

/// What to send ahead of a batch on one backend.
#[derive(Debug, Default)]
pub struct Plan {
    pub prefix: BytesMut,
    /// Responses to the prefix (CloseComplete, ParseComplete) to swallow.
    pub injected: usize,
}

/// Closes statement `name` on a backend before it is parsed again there; the unnamed
/// statement needs none, since a Parse of it replaces it (and each Close costs the backend
/// a message and an answer: pgbench `-M extended` parses the unnamed statement every time).
fn close_statement(name: &str, plan: &mut Plan) {
    if name.is_empty() {
        return;
    }
    plan.injected += 1;
    let out = &mut plan.prefix;
    out.put_u8(b'C');
    out.put_i32(4 + 1 + name.len() as i32 + 1);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

impl Statements {
    /// Statement `name` as the client defined it, with the shared form of its name.
    pub fn get(&self, name: &str) -> Option<(&Name, &Statement)> {
        self.defined.get_key_value(name)
    }

    /// The shared form of `name`: the map's own key when the statement is known.
    pub fn name(&self, name: &str) -> Name {
        match self.defined.get_key_value(name) {
            Some((shared, _)) => Arc::clone(shared),
            None => Arc::from(name),
        }
    }

    /// Records a Parse the client sent (the whole message, before the batch is planned):
    /// the statement's shared name and the version it now has.
    pub fn define(&mut self, name: &str, parse: &[u8], classified: Arc<Classified>) -> (Name, u64) {
        self.next_version += 1;
        let version = self.next_version;
        // A name parsed again (the unnamed statement, every time with pgbench -M extended)
        // keeps its key, and its copy of the message while the text is the same.
        if let Some(statement) = self.defined.get_mut(name) {
            if statement.parse[..] != *parse {
                statement.parse = Bytes::copy_from_slice(parse);
            }
            statement.classified = classified;
            statement.version = version;
            return (Arc::clone(&statement.name), version);
        }
        let shared: Name = Arc::from(name);
        let statement = Statement {
            name: Arc::clone(&shared),
            parse: Bytes::copy_from_slice(parse),
            classified,
            version,
        };
        self.defined.insert(Arc::clone(&shared), statement);
        (shared, version)
    }

    /// Plans a batch's statement uses for backend `target`, updating what that backend
    /// will hold. The batch's own Parse messages were recorded with [`Statements::define`]
    /// as the batch was read.
    pub fn plan(&mut self, uses: &[StatementUse], target: Target) -> Plan {
        let mut plan = Plan::default();
        let mut first_uses = std::mem::take(&mut self.first_uses);
        first_uses.clear();
        let prepared = &mut self.prepared[target.index()];
        for (index, usage) in uses.iter().enumerate() {
            let first_use = !first_uses
                .iter()
                .any(|&earlier| uses[earlier].name() == usage.name());
            if first_use {
                first_uses.push(index);
            }
            match usage {
                StatementUse::Parse { name, version } => match prepared.get_mut(name) {
                    Some(held) => {
                        if first_use {
                            close_statement(name, &mut plan);
                        }
                        *held = *version;
                    }
                    None => {
                        prepared.insert(Arc::clone(name), *version);
                    }
                },
                StatementUse::Use { name } if first_use => {
                    let Some(defined) = self.defined.get(name) else {
                        continue;
                    };
                    match prepared.get_mut(name) {
                        Some(held) if *held == defined.version => {}
                        Some(held) => {
                            close_statement(name, &mut plan);
                            *held = defined.version;
                            plan.prefix.extend_from_slice(&defined.parse);
                            plan.injected += 1;
                        }
                        None => {
                            prepared.insert(Arc::clone(name), defined.version);
                            plan.prefix.extend_from_slice(&defined.parse);
                            plan.injected += 1;
                        }
                    }
                }
                StatementUse::Use { .. } => {}
                StatementUse::Close { name } => {
                    prepared.remove(name);
                }
            }
        }
        self.first_uses = first_uses;
        plan
    }

    /// The client closed statement `name`: forget its text (backends that still hold it
    /// get a Close before any new Parse of the name).
    pub fn closed(&mut self, name: &str) {
        self.defined.remove(name);
    }

    /// A batch on `target` failed: what it touched there is uncertain now.
    pub fn uncertain(&mut self, target: Target, uses: &[StatementUse]) {
        for usage in uses {
            if let Some(version) = self.prepared[target.index()].get_mut(usage.name()) {
                *version = UNKNOWN;
            }
        }
    }

    /// DEALLOCATE `name` ran on the primary.
    pub fn deallocated(&mut self, name: &str) {
        self.defined.remove(name);
        self.prepared[Target::Primary.index()].remove(name);
    }

    /// DISCARD ALL or DEALLOCATE ALL ran on the primary.
    pub fn deallocated_all(&mut self) {
        self.defined.clear();
        self.prepared[Target::Primary.index()].clear();
    }

    /// A new connection to `target` holds nothing.
    pub fn reconnected(&mut self, target: Target) {
        self.prepared[target.index()].clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(b'P');
        out.put_i32(4 + name.len() as i32 + 1 + 9 + 2);
        out.put_slice(name.as_bytes());
        out.put_u8(0);
        out.put_slice(b"SELECT 1\0");
        out.put_i16(0);
        out.freeze()
    }

    /// A batch that parses `name` and binds it, as a client sends it.
    fn parse_and_bind(statements: &mut Statements, name: &str) -> Vec<StatementUse> {
        let classified = Arc::new(Classified::primary());
        let (name, version) = statements.define(name, &parse(name), classified);
        vec![
            StatementUse::Parse {
                name: Arc::clone(&name),
                version,
            },
            StatementUse::Use { name },
        ]
    }

    #[test]
    fn the_unnamed_statement_is_parsed_again_without_a_close() {
        let mut statements = Statements::default();
        for _ in 0..3 {
            let uses = parse_and_bind(&mut statements, "");
            let plan = statements.plan(&uses, Target::Replica);
            assert_eq!((plan.injected, plan.prefix.len()), (0, 0));
        }
    }

    #[test]
    fn a_named_statement_parsed_again_is_closed_first() {
        let mut statements = Statements::default();
        let uses = parse_and_bind(&mut statements, "s1");
        assert_eq!(statements.plan(&uses, Target::Replica).injected, 0);
        let uses = parse_and_bind(&mut statements, "s1");
        let plan = statements.plan(&uses, Target::Replica);
        assert_eq!(plan.injected, 1);
        assert_eq!(&plan.prefix[..], b"C\0\0\0\x08Ss1\0");
    }

    #[test]
    fn a_statement_used_on_the_other_backend_is_prepared_there_first() {
        let mut statements = Statements::default();
        let uses = parse_and_bind(&mut statements, "");
        statements.plan(&uses, Target::Primary);
        let bind_only = [StatementUse::Use { name: "".into() }];
        let plan = statements.plan(&bind_only, Target::Replica);
        assert_eq!(plan.injected, 1);
        assert_eq!(&plan.prefix[..], &parse("")[..]);
        // The replica holds an older unnamed statement after the client re-parses on the
        // primary: it is replaced by a Parse alone.
        let uses = parse_and_bind(&mut statements, "");
        statements.plan(&uses, Target::Primary);
        let plan = statements.plan(&bind_only, Target::Replica);
        assert_eq!(plan.injected, 1);
        assert_eq!(&plan.prefix[..], &parse("")[..]);
    }

    #[test]
    fn a_pipelined_batch_of_binds_prepares_its_statement_once() {
        let mut statements = Statements::default();
        let uses = parse_and_bind(&mut statements, "s1");
        statements.plan(&uses, Target::Primary);
        let binds = vec![StatementUse::Use { name: "s1".into() }; 1000];
        let plan = statements.plan(&binds, Target::Replica);
        assert_eq!(plan.injected, 1);
        assert_eq!(&plan.prefix[..], &parse("s1")[..]);
        assert_eq!(statements.plan(&binds, Target::Replica).injected, 0);
    }
}
