//! `SET`, `RESET` and `SHOW lagprobe.*` answered by the proxy itself, in both protocols.
//!
//! Drivers such as psycopg 3, sqlx and JDBC send every statement through the extended
//! protocol (Parse, Bind, Describe, Execute, Sync), so the proxy's own settings must be
//! answerable there too: a batch whose statements are all `lagprobe.*` commands never
//! reaches a backend, and its every message gets the answer PostgreSQL would give.

use std::collections::HashMap;

use bytes::BytesMut;
use pgwire::messages::{
    data::{DataRow, FieldDescription, NoData, ParameterDescription, RowDescription},
    extendedquery::{BindComplete, CloseComplete, ParseComplete},
    response::CommandComplete,
};

use super::{ProxyCommand, ProxyError, Session};
use crate::proxy::{
    CommandError,
    wire::{self, ClientMessage},
};

/// The PostgreSQL type of every `SHOW` column: text.
const TEXT_OID: i32 = 25;

/// Which kinds of statement an extended-protocol batch names.
#[derive(Debug, Default)]
pub(super) struct Mix {
    /// A Parse or Bind of a `lagprobe.*` command.
    pub commands: bool,
    /// A Parse or Bind of anything else (or of a statement the proxy does not know).
    pub others: bool,
}

impl Mix {
    pub fn note(&mut self, command: bool) {
        if command {
            self.commands = true;
        } else {
            self.others = true;
        }
    }
}

/// Why a local batch message failed; the rest of the batch is skipped up to its Sync,
/// as PostgreSQL does after an error.
enum LocalError {
    Command(CommandError),
    /// A message naming a statement or portal that is not a `lagprobe.*` command.
    Mixed,
}

impl LocalError {
    fn put(&self, out: &mut BytesMut) {
        match self {
            LocalError::Command(error) => {
                wire::error_response(false, error.sqlstate(), &error.to_string(), out)
            }
            LocalError::Mixed => wire::error_response(
                false,
                "0A000",
                "lagprobe.* commands cannot share an extended-protocol batch with other \
                 statements through the proxy: send them in a batch of their own",
                out,
            ),
        }
    }
}

/// The columns a command returns: `SHOW` one text column named after the setting, `SET`
/// and `RESET` none (in the simple protocol there is no NoData to send).
pub(super) fn describe(command: &ProxyCommand, extended: bool, out: &mut BytesMut) {
    match command {
        ProxyCommand::Show { name } => {
            let column = format!("lagprobe.{name}");
            let field = FieldDescription::new(column, 0, 0, TEXT_OID as u32, -1, -1, 0);
            wire::put(&RowDescription::new(vec![field]), out);
        }
        ProxyCommand::Set { .. } if extended => wire::put(&NoData::new(), out),
        ProxyCommand::Set { .. } => {}
    }
}

impl Session {
    /// Runs a command: a `SHOW` row (its description comes from [`describe`]) and the
    /// command tag.
    pub(super) async fn execute_command(
        &mut self,
        command: &ProxyCommand,
        out: &mut BytesMut,
    ) -> Result<(), CommandError> {
        match command {
            ProxyCommand::Set { name, value } => {
                self.set_variable(name, value.as_deref())?;
                let tag = if value.is_some() { "SET" } else { "RESET" };
                wire::put(&CommandComplete::new(tag.to_owned()), out);
            }
            ProxyCommand::Show { name } => {
                let value = self.show_variable(name).await?;
                let mut row = BytesMut::new();
                row.extend_from_slice(&(value.len() as i32).to_be_bytes());
                row.extend_from_slice(value.as_bytes());
                wire::put(&DataRow::new(row, 1), out);
                wire::put(&CommandComplete::new("SHOW".to_owned()), out);
            }
        }
        Ok(())
    }

    /// Answers an extended-protocol batch of `lagprobe.*` commands (its messages back to
    /// back; `mixed`: it names other statements too, which is refused with 0A000) message
    /// by message.
    pub(super) async fn answer_locally(
        &mut self,
        batch: &[u8],
        mixed: bool,
    ) -> Result<(), ProxyError> {
        let mut out = BytesMut::new();
        let mut portals: HashMap<String, ProxyCommand> = HashMap::new();
        let mut failed = mixed;
        if mixed {
            LocalError::Mixed.put(&mut out);
        }
        for frame in wire::frames(batch) {
            match frame[0] {
                b'S' => {
                    failed = false;
                    portals.clear();
                    self.after_commands().await?;
                    wire::ready_for_query(self.status, &mut out);
                }
                b'H' => {}
                _ if failed => {}
                _ => {
                    if let Err(error) = self.answer_message(frame, &mut portals, &mut out).await {
                        error.put(&mut out);
                        failed = true;
                    }
                }
            }
        }
        self.client.send(&out).await
    }

    async fn answer_message(
        &mut self,
        frame: &[u8],
        portals: &mut HashMap<String, ProxyCommand>,
        out: &mut BytesMut,
    ) -> Result<(), LocalError> {
        let command_of = |session: &Session, statement: &str| {
            session
                .statements
                .get(statement)
                .and_then(|(_, defined)| defined.classified.command.clone())
                .ok_or(LocalError::Mixed)
        };
        match wire::client_message(frame).map_err(|_| LocalError::Mixed)? {
            ClientMessage::Parse { statement, .. } => {
                command_of(self, statement)?;
                wire::put(&ParseComplete::new(), out);
            }
            ClientMessage::Bind { portal, statement } => {
                portals.insert(portal.to_owned(), command_of(self, statement)?);
                wire::put(&BindComplete::new(), out);
            }
            ClientMessage::Describe { kind: b'S', name } => {
                let command = command_of(self, name)?;
                wire::put(&ParameterDescription::new(Vec::new()), out);
                describe(&command, true, out);
            }
            ClientMessage::Describe { name, .. } => {
                describe(portals.get(name).ok_or(LocalError::Mixed)?, true, out)
            }
            ClientMessage::Execute { portal } => {
                let command = portals.get(portal).cloned().ok_or(LocalError::Mixed)?;
                self.execute_command(&command, out)
                    .await
                    .map_err(LocalError::Command)?;
            }
            ClientMessage::Close { kind, name } => {
                if kind == b'S' {
                    self.statements.closed(name);
                } else {
                    portals.remove(name);
                }
                wire::put(&CloseComplete::new(), out);
            }
            ClientMessage::Query { .. } | ClientMessage::Other => return Err(LocalError::Mixed),
        }
        Ok(())
    }
}
