//! SCRAM-SHA-256 toward clients (RFC 5802 and 7677, as PostgreSQL speaks it), so that a
//! password set with `LAGPROBE_PROXY_PASSWORD` never crosses the wire, not even hashed in a
//! replayable form.
//!
//! Only the message flow is here. The crypto is the crates': the salted password (PBKDF2
//! with SASLprep) comes from postgres-protocol's verifier, computed once at start; HMAC and
//! SHA-256 from the `hmac` and `sha2` crates; the nonce from the OS (`getrandom`). Channel
//! binding is refused: the proxy offers no TLS, so there is no channel to bind to.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The mechanism's name in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Random bytes in the server's part of the nonce.
const SERVER_NONCE_BYTES: usize = 18;

/// What the proxy keeps of its password: PostgreSQL's stored form, never the password.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt_b64: String,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

/// Why an exchange failed: the client broke the protocol, or gave the wrong password.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("password authentication failed")]
    WrongPassword,
}

fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Verifier {
    /// The stored form of `password` with a fresh salt (PBKDF2 at PostgreSQL's 4096
    /// iterations: a few milliseconds, once at start).
    pub fn new(password: &str) -> Self {
        let stored = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Verifier::parse(&stored).expect("postgres-protocol writes well-formed verifiers")
    }

    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    fn parse(stored: &str) -> Option<Self> {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt_b64) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt_b64: salt_b64.to_owned(),
            stored_key: STANDARD.decode(stored_key).ok()?,
            server_key: STANDARD.decode(server_key).ok()?,
        })
    }

    /// Starts an exchange from the client's first message (SASLInitialResponse's data).
    pub fn start(&self, client_first: &[u8]) -> Result<Exchange, ScramError> {
        let client_first =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2 header: "n,," (no channel binding) or "y,," (client could, thinks we cannot).
        let (gs2_header, bare) = match client_first.get(..3) {
            Some("n,," | "y,,") => client_first.split_at(3),
            _ => return Err(ScramError::Malformed("channel binding is not offered")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attribute| attribute.strip_prefix("r="))
            .filter(|nonce| !nonce.is_empty())
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let mut random = [0u8; SERVER_NONCE_BYTES];
        getrandom::fill(&mut random).map_err(|_| ScramError::Malformed("no randomness"))?;
        let nonce = format!("{client_nonce}{}", STANDARD.encode(random));
        let server_first = format!("r={nonce},s={},i={}", self.salt_b64, self.iterations);
        Ok(Exchange {
            verifier: self.clone(),
            gs2_header: gs2_header.to_owned(),
            client_first_bare: bare.to_owned(),
            nonce,
            server_first,
        })
    }
}

/// One client's exchange after its first message.
pub struct Exchange {
    verifier: Verifier,
    gs2_header: String,
    client_first_bare: String,
    nonce: String,
    server_first: String,
}

impl Exchange {
    /// The server-first message (AuthenticationSASLContinue's data).
    pub fn server_first(&self) -> &[u8] {
        self.server_first.as_bytes()
    }

    /// Checks the client's proof (SASLResponse's data); the server-final message
    /// (AuthenticationSASLFinal's data) when it holds.
    pub fn finish(&self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let client_final =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let attribute = |name: &str| {
            without_proof
                .split(',')
                .find_map(|attribute| attribute.strip_prefix(name))
        };
        if attribute("c=") != Some(&STANDARD.encode(&self.gs2_header)) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if attribute("r=") != Some(&self.nonce) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::WrongPassword);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        if !constant_time_eq(&Sha256::digest(&client_key), &self.verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    use super::*;

    /// postgres-protocol's client (what tokio-postgres uses) against this server.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::new(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let exchange = verifier.start(client.message())?;
        client.update(exchange.server_first()).unwrap();
        let server_final = exchange.finish(client.message())?;
        client
            .finish(&server_final)
            .expect("the client accepts our signature");
        Ok(())
    }

    #[test]
    fn the_right_password_passes_both_ways_and_a_wrong_one_fails() {
        assert_eq!(exchange("s3cret pässword", "s3cret pässword"), Ok(()));
        assert_eq!(exchange("s3cret", "guess"), Err(ScramError::WrongPassword));
        let verifier = Verifier::new("x");
        assert!(verifier.start(b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(verifier.start(b"n,,n=,r=").is_err());
        assert!(format!("{verifier:?}").contains(".."));
    }
}
