//! Bearer-token check for the TCP listener.

use std::sync::Arc;

use tonic::{Request, Status};

/// Checks `authorization: Bearer TOKEN` on every call.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>);

impl BearerToken {
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token.trim().as_bytes()))
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match presented {
            Some(token) if constant_time_eq(token, &self.0) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer TOKEN` metadata",
            )),
        }
    }
}

/// Compares without an early exit, so timing says nothing about how much
/// of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(header: Option<&str>) -> Result<Request<()>, Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        BearerToken::new("s3cret\n").check(request)
    }

    #[test]
    fn only_the_exact_token_passes() {
        assert!(call(Some("Bearer s3cret")).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert_eq!(
                call(bad).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad:?}"
            );
        }
    }
}
