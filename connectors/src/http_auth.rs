//! Who may call a webhook (`auth:` of an `http` source): anyone (`none`), a sender that signs
//! the raw body with a shared secret (`hmac_sha256`, GitHub's `X-Hub-Signature-256` and its
//! many imitators), or one that presents a bearer token (`bearer`).
//!
//! Every comparison is constant-time (the HMAC check through `Mac::verify_slice`, the token
//! through `subtle`), so the time a refusal takes says nothing about how close a guess was. A
//! request without credentials is answered 401, one with wrong credentials 403; both are
//! counted in `sluice_http_auth_failures_total{source, reason}` and never reach the function.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sluice_config::WebhookAuth;
use subtle::ConstantTimeEq;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No credentials at all: 401.
    Missing,
    /// Credentials that do not check: 403.
    Invalid,
}

impl Refusal {
    /// The `reason` label of the metric.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
        }
    }
}

/// Whether the credentials can be checked before the body is read (a bearer token), so that a
/// refused request costs no body read.
pub(crate) fn check_headers(auth: &WebhookAuth, headers: &HeaderMap) -> Result<(), Refusal> {
    match auth {
        WebhookAuth::Bearer { token } => {
            let given = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or(Refusal::Missing)?;
            if bool::from(given.trim().as_bytes().ct_eq(token.expose().as_bytes())) {
                Ok(())
            } else {
                Err(Refusal::Invalid)
            }
        }
        WebhookAuth::HmacSha256 { header, .. } if !headers.contains_key(header.as_str()) => {
            Err(Refusal::Missing)
        }
        _ => Ok(()),
    }
}

/// Checks what needs the raw body: the HMAC-SHA256 signature, `sha256=<hex>` or bare hex.
pub(crate) fn check_body(
    auth: &WebhookAuth,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Refusal> {
    let WebhookAuth::HmacSha256 { secret, header } = auth else {
        return Ok(());
    };
    let given = headers
        .get(header.as_str())
        .and_then(|v| v.to_str().ok())
        .ok_or(Refusal::Missing)?
        .trim();
    let hex_digest = given.strip_prefix("sha256=").unwrap_or(given);
    let signature = hex::decode(hex_digest).map_err(|_| Refusal::Invalid)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).map_err(|_| Refusal::Invalid)?;
    mac.update(body);
    mac.verify_slice(&signature).map_err(|_| Refusal::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use sluice_config::Secret;

    fn hmac_auth() -> WebhookAuth {
        WebhookAuth::HmacSha256 {
            secret: Secret::new("It's a Secret to Everybody"),
            header: "X-Hub-Signature-256".into(),
        }
    }

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).expect("header"));
        h
    }

    /// GitHub's documented example: this secret and body give this signature.
    const GITHUB_SIGNATURE: &str =
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn accepts_githubs_documented_signature_prefixed_or_bare() {
        let body = b"Hello, World!";
        for value in [
            format!("sha256={GITHUB_SIGNATURE}"),
            GITHUB_SIGNATURE.to_owned(),
        ] {
            let headers = with("x-hub-signature-256", &value);
            assert_eq!(check_headers(&hmac_auth(), &headers), Ok(()));
            assert_eq!(check_body(&hmac_auth(), &headers, body), Ok(()));
        }
    }

    #[test]
    fn refuses_a_signature_of_another_body_or_not_hex_or_missing() {
        let headers = with("x-hub-signature-256", &format!("sha256={GITHUB_SIGNATURE}"));
        assert_eq!(
            check_body(&hmac_auth(), &headers, b"Hello, World?"),
            Err(Refusal::Invalid)
        );
        let garbage = with("x-hub-signature-256", "sha256=zz");
        assert_eq!(
            check_body(&hmac_auth(), &garbage, b"x"),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check_headers(&hmac_auth(), &HeaderMap::new()),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let auth = WebhookAuth::Bearer {
            token: Secret::new("t0k3n"),
        };
        assert_eq!(
            check_headers(&auth, &with("authorization", "Bearer t0k3n")),
            Ok(())
        );
        assert_eq!(
            check_headers(&auth, &with("authorization", "Bearer t0k3")),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check_headers(&auth, &with("authorization", "Basic dDBrM24=")),
            Err(Refusal::Missing)
        );
        assert_eq!(
            check_headers(&auth, &HeaderMap::new()),
            Err(Refusal::Missing)
        );
        assert_eq!(check_headers(&WebhookAuth::None, &HeaderMap::new()), Ok(()));
    }
}
