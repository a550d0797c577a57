//! Who may call what. With tokens configured, every request carries
//! `authorization: Bearer <token>`: client tokens may use the packet API, admin tokens also
//! the cluster administration, and the peer token (shared by the nodes) everything,
//! including the Raft transport. A missing or unknown token is UNAUTHENTICATED; a known
//! token used beyond its role is PERMISSION_DENIED. Health and reflection stay open for
//! load balancers. With no token configured (the local example), everything is open.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;
use tonic::Request;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Tokens allowed to send, grab, open and read packets.
    pub client_tokens: Vec<String>,
    /// Tokens also allowed to administer the cluster.
    pub admin_tokens: Vec<String>,
    /// The token nodes present to each other (the same on every node).
    pub peer_token: Option<String>,
}

impl AuthSettings {
    pub fn enabled(&self) -> bool {
        !self.client_tokens.is_empty() || !self.admin_tokens.is_empty() || self.peer_token.is_some()
    }
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Client,
    Admin,
    Peer,
}

/// Checks incoming requests against the configured tokens; one per service, with the role
/// the service needs.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Tokens>,
    needs: Role,
}

struct Tokens {
    enabled: bool,
    clients: HashSet<String>,
    admins: HashSet<String>,
    peer: Option<String>,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, needs: Role) -> Self {
        let tokens = Tokens {
            enabled: settings.enabled(),
            clients: settings.client_tokens.iter().cloned().collect(),
            admins: settings.admin_tokens.iter().cloned().collect(),
            peer: settings.peer_token.clone(),
        };
        Authenticator { tokens: Arc::new(tokens), needs }
    }

    fn role_of(&self, token: &str) -> Option<Role> {
        let t = &self.tokens;
        if t.peer.as_deref() == Some(token) {
            Some(Role::Peer)
        } else if t.admins.contains(token) {
            Some(Role::Admin)
        } else if t.clients.contains(token) {
            Some(Role::Client)
        } else {
            None
        }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.tokens.enabled {
            return Ok(request);
        }
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated("authorization: a bearer token is required"));
        };
        match self.role_of(token) {
            None => Err(Status::unauthenticated("authorization: unknown token")),
            Some(role) if role < self.needs => {
                Err(Status::permission_denied(format!("authorization: this token may not call this service (needs {:?})", self.needs)))
            }
            Some(_) => Ok(request),
        }
    }
}

/// Adds a bearer token to outgoing requests (none when `token` is `None`).
#[derive(Clone)]
pub struct BearerToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Self {
        BearerToken { header: token.and_then(|t| format!("Bearer {t}").parse().ok()) }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings { client_tokens: vec!["c".into()], admin_tokens: vec!["a".into()], peer_token: Some("p".into()) }
    }

    fn call(auth: &mut Authenticator, token: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        auth.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn roles_are_enforced() {
        let mut admin = Authenticator::new(&settings(), Role::Admin);
        assert_eq!(call(&mut admin, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut admin, Some("x")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut admin, Some("c")), Err(tonic::Code::PermissionDenied));
        assert_eq!(call(&mut admin, Some("a")), Ok(()));
        assert_eq!(call(&mut admin, Some("p")), Ok(()));
        let mut client = Authenticator::new(&settings(), Role::Client);
        assert_eq!(call(&mut client, Some("c")), Ok(()));
        let mut open = Authenticator::new(&AuthSettings::default(), Role::Peer);
        assert_eq!(call(&mut open, None), Ok(()));
    }
}
