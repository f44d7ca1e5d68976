//! Verifies AWS Signature Version 4 on requests to Lambda's API, as AWS does: the
//! `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…` header or a
//! presigned query string (`X-Amz-Credential`, `X-Amz-Signature`, …), `X-Amz-Date` within five
//! minutes (and a presigned URL within its `X-Amz-Expires`), service `lambda`, the payload's
//! hash. The expected signature is computed by AWS's own signer (`aws-sigv4`) over the request
//! as received, at the request's own date, region and signed header set, and compared in
//! constant time.
//!
//! What a client sends here is hostile input: the parser never panics, refuses oversize or
//! malformed fields before any work, and does a bounded amount of work per request (one
//! canonical request and signature, over at most [`MAX_SIGNED_HEADERS`] headers).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use chrono::{DateTime, NaiveDateTime, Utc};
use http::{HeaderMap, Method};
use subtle::ConstantTimeEq;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service every credential scope must name.
pub const SERVICE: &str = "lambda";
/// How far a request's `X-Amz-Date` may be from the clock, either way, as AWS allows.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);
/// The longest presigned URL lifetime AWS accepts, seven days.
const MAX_EXPIRES: u64 = 7 * 24 * 3600;
/// The longest `Authorization` header read; a real one is a few hundred bytes.
const MAX_AUTHORIZATION: usize = 8 * 1024;
/// The most headers one signature may cover.
pub const MAX_SIGNED_HEADERS: usize = 64;

const INVALID_SIGNATURE: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

/// Why a request's signature was refused; each answers 403 with Lambda's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header and no presigned query string.
    #[error("Missing Authentication Token")]
    Missing,
    /// A signature that cannot be read: what is missing or wrong.
    #[error("{0}")]
    Incomplete(String),
    /// An access key id that no principal has.
    #[error("The security token included in the request is invalid.")]
    UnknownKey { access_key_id: String },
    /// The signature is not the one the key gives, or the request is not signed as Lambda
    /// requires (another service, a date that does not match its scope, a stale date).
    #[error("{message}")]
    Invalid {
        access_key_id: String,
        message: String,
    },
}

impl AuthError {
    /// Lambda's error code, for `x-amzn-errortype`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationTokenException",
            AuthError::Incomplete(_) => "IncompleteSignatureException",
            AuthError::UnknownKey { .. } => "UnrecognizedClientException",
            AuthError::Invalid { .. } => "InvalidSignatureException",
        }
    }

    /// The access key id the request claimed, once it could be read.
    pub fn access_key_id(&self) -> Option<&str> {
        match self {
            AuthError::Missing | AuthError::Incomplete(_) => None,
            AuthError::UnknownKey { access_key_id } | AuthError::Invalid { access_key_id, .. } => {
                Some(access_key_id)
            }
        }
    }
}

/// A signature as the request states it, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub access_key_id: String,
    /// `YYYYMMDD` from the credential scope.
    pub scope_date: String,
    pub region: String,
    pub service: String,
    /// Lower-case header names, in the order given.
    pub signed_headers: Vec<String>,
    /// 64 lower-case hex digits.
    pub signature: String,
    /// Presigned only: `X-Amz-Date` and `X-Amz-Expires` from the query.
    pub presigned: Option<(String, u64)>,
}

/// Reads an `Authorization` header's value. Never panics; bounded by [`MAX_AUTHORIZATION`].
pub fn parse_authorization(value: &str) -> Result<Claim, AuthError> {
    if value.len() > MAX_AUTHORIZATION {
        return Err(AuthError::Incomplete(format!(
            "Authorization header is longer than {MAX_AUTHORIZATION} bytes."
        )));
    }
    let Some(rest) = value.strip_prefix(ALGORITHM) else {
        let algorithm = value.split_whitespace().next().unwrap_or_default();
        return Err(AuthError::Incomplete(format!(
            "Unsupported Authorization Type: '{}'; only {ALGORITHM} is accepted.",
            clip(algorithm)
        )));
    };
    if !rest.starts_with(' ') {
        return Err(AuthError::Incomplete(format!(
            "Authorization header requires the {ALGORITHM} algorithm followed by a space."
        )));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((key, val)) = part.split_once('=') else {
            return Err(AuthError::Incomplete(format!(
                "Authorization header requires each component to be key=value: '{}'.",
                clip(part)
            )));
        };
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => continue,
        };
        if slot.replace(val).is_some() {
            return Err(AuthError::Incomplete(format!(
                "Authorization header gives '{key}' twice."
            )));
        }
    }
    let mut missing = Vec::new();
    for (name, v) in [
        ("Credential", credential),
        ("Signature", signature),
        ("SignedHeaders", signed),
    ] {
        if v.is_none() {
            missing.push(format!("Authorization header requires '{name}' parameter."));
        }
    }
    match (credential, signed, signature) {
        (Some(c), Some(h), Some(s)) => claim(c, h, s, None),
        _ => Err(AuthError::Incomplete(missing.join(" "))),
    }
}

/// The presigned query parameters, if the query has any (`None`: it is not presigned). The
/// parameters named here are removed from what is returned as the rest of the query, since
/// the signer adds them back in their canonical place.
fn parse_presigned(query: &str) -> Option<Result<(Claim, String), AuthError>> {
    let mut fields: HashMap<&str, Cow<'_, str>> = HashMap::new();
    let mut rest = Vec::new();
    let mut any = false;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k.starts_with("X-Amz-") {
            any = true;
            let decoded = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            if fields.insert(k, decoded).is_some() {
                return Some(Err(AuthError::Incomplete(format!(
                    "The query string gives '{}' twice.",
                    clip(k)
                ))));
            }
            // The security token (none here) and any other X-Amz- parameter stay in the query.
            if matches!(
                k,
                "X-Amz-Algorithm"
                    | "X-Amz-Credential"
                    | "X-Amz-Date"
                    | "X-Amz-Expires"
                    | "X-Amz-SignedHeaders"
                    | "X-Amz-Signature"
            ) {
                continue;
            }
        }
        rest.push(pair);
    }
    if !any || !fields.contains_key("X-Amz-Signature") && !fields.contains_key("X-Amz-Algorithm") {
        return None;
    }
    let mut missing = Vec::new();
    for name in [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Signature",
        "X-Amz-SignedHeaders",
        "X-Amz-Date",
        "X-Amz-Expires",
    ] {
        if !fields.contains_key(name) {
            missing.push(format!(
                "AWS query-string parameters must include '{name}'."
            ));
        }
    }
    if !missing.is_empty() {
        return Some(Err(AuthError::Incomplete(missing.join(" "))));
    }
    let get = |k: &str| fields.get(k).map(|v| v.as_ref()).unwrap_or_default();
    if get("X-Amz-Algorithm") != ALGORITHM {
        return Some(Err(AuthError::Incomplete(format!(
            "X-Amz-Algorithm only supports '{ALGORITHM}'."
        ))));
    }
    let expires = match get("X-Amz-Expires").parse::<u64>() {
        Ok(n) if (1..=MAX_EXPIRES).contains(&n) => n,
        _ => {
            return Some(Err(AuthError::Incomplete(format!(
                "X-Amz-Expires must be a number of seconds from 1 to {MAX_EXPIRES}."
            ))));
        }
    };
    let date = get("X-Amz-Date").to_owned();
    Some(
        claim(
            get("X-Amz-Credential"),
            get("X-Amz-SignedHeaders"),
            get("X-Amz-Signature"),
            Some((date, expires)),
        )
        .map(|c| (c, rest.join("&"))),
    )
}

fn claim(
    credential: &str,
    signed: &str,
    signature: &str,
    presigned: Option<(String, u64)>,
) -> Result<Claim, AuthError> {
    let parts: Vec<&str> = credential.splitn(6, '/').collect();
    let [key, date, region, service, terminator] = parts.as_slice() else {
        return Err(AuthError::Incomplete(format!(
            "Credential should have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '{}'.",
            clip(credential)
        )));
    };
    let key_ok = (1..=128).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric());
    if !key_ok {
        return Err(AuthError::Incomplete(format!(
            "Credential has an invalid access key id '{}'.",
            clip(key)
        )));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::Incomplete(format!(
            "Credential has an invalid date '{}': expected YYYYMMDD.",
            clip(date)
        )));
    }
    let region_ok = (1..=64).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !region_ok {
        return Err(AuthError::Incomplete(format!(
            "Credential has an invalid region '{}'.",
            clip(region)
        )));
    }
    if *terminator != "aws4_request" {
        return Err(AuthError::Incomplete(format!(
            "Credential should be scoped with a valid terminator: 'aws4_request', not '{}'.",
            clip(terminator)
        )));
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(AuthError::Incomplete(
            "Signature must be 64 lower-case hexadecimal digits.".to_owned(),
        ));
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
    if signed_headers.len() > MAX_SIGNED_HEADERS {
        return Err(AuthError::Incomplete(format!(
            "SignedHeaders lists more than {MAX_SIGNED_HEADERS} headers."
        )));
    }
    let names_ok = signed_headers.iter().all(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    });
    if !names_ok {
        return Err(AuthError::Incomplete(format!(
            "SignedHeaders must be lower-case header names separated by ';', got '{}'.",
            clip(signed)
        )));
    }
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(AuthError::Incomplete(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.".to_owned(),
        ));
    }
    Ok(Claim {
        access_key_id: (*key).to_owned(),
        scope_date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        signed_headers,
        signature: signature.to_owned(),
        presigned,
    })
}

/// At most 128 characters of something a client sent, for an error message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(128) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A request as received: what the signature covers.
pub struct Request<'a> {
    pub method: &'a Method,
    /// The path as sent (still percent-encoded).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Where a principal's secret is found by its access key id.
pub trait Keys {
    /// The secret access key of `access_key_id`, or `None` when no principal has it.
    fn secret(&self, access_key_id: &str) -> Option<&str>;
}

/// Verifies `request`'s signature with the keys in `keys` at time `now`. Returns the access
/// key id that signed it.
pub fn verify(
    request: &Request<'_>,
    keys: &impl Keys,
    now: SystemTime,
) -> Result<String, AuthError> {
    let authorization = request
        .headers
        .get_all("authorization")
        .iter()
        .collect::<Vec<_>>();
    let (claim, query) = match authorization.as_slice() {
        [] => match request.query.and_then(parse_presigned) {
            Some(parsed) => {
                let (claim, rest) = parsed?;
                (claim, Some(rest))
            }
            None => return Err(AuthError::Missing),
        },
        [one] => {
            let text = one.to_str().map_err(|_| {
                AuthError::Incomplete("Authorization header is not printable ASCII.".to_owned())
            })?;
            (parse_authorization(text)?, request.query.map(str::to_owned))
        }
        _ => {
            return Err(AuthError::Incomplete(
                "Only one Authorization header may be sent.".to_owned(),
            ));
        }
    };
    let key = claim.access_key_id.clone();
    let invalid = |message: String| AuthError::Invalid {
        access_key_id: key.clone(),
        message,
    };
    let Some(secret) = keys.secret(&claim.access_key_id) else {
        return Err(AuthError::UnknownKey {
            access_key_id: claim.access_key_id,
        });
    };
    if claim.service != SERVICE {
        return Err(invalid(format!(
            "Credential should be scoped to correct service: '{SERVICE}'. "
        )));
    }
    let date_text = match &claim.presigned {
        Some((date, _)) => date.clone(),
        None => {
            let mut dates = request.headers.get_all("x-amz-date").iter();
            match (dates.next(), dates.next()) {
                (Some(v), None) => v
                    .to_str()
                    .map_err(|_| invalid("X-Amz-Date is not printable ASCII.".to_owned()))?
                    .to_owned(),
                (None, _) => {
                    return Err(AuthError::Incomplete(
                        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header; Sluice takes 'X-Amz-Date'.".to_owned(),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "Only one X-Amz-Date header may be sent.".to_owned(),
                    ));
                }
            }
        }
    };
    let signed_at = parse_amz_date(&date_text).ok_or_else(|| {
        invalid(format!(
            "X-Amz-Date '{}' must be in the ISO8601 basic format YYYYMMDD'T'HHMMSS'Z'.",
            clip(&date_text)
        ))
    })?;
    if !date_text.starts_with(&claim.scope_date) {
        return Err(invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{}'.",
            claim.scope_date,
            &date_text[..8],
            date_text
        )));
    }
    check_time(signed_at, &claim, now).map_err(invalid)?;
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(claim.signed_headers.len());
    for name in &claim.signed_headers {
        // The signer adds X-Amz-Date itself from the time it is given.
        if claim.presigned.is_none() && name == "x-amz-date" {
            continue;
        }
        let mut found = false;
        for value in request.headers.get_all(name.as_str()) {
            let value = value
                .to_str()
                .map_err(|_| invalid(format!("Header '{name}' is not printable ASCII.")))?;
            headers.push((name.as_str(), value));
            found = true;
        }
        if !found {
            return Err(invalid(format!(
                "'{name}' is a 'SignedHeader' but the request has no such header."
            )));
        }
    }
    let uri = match &query {
        Some(q) if !q.is_empty() => format!("http://sluice{}?{q}", request.path),
        _ => format!("http://sluice{}", request.path),
    };
    let expected = expected_signature(
        request.method.as_str(),
        &uri,
        headers,
        request.body,
        &claim,
        signed_at,
        secret,
    )
    .map_err(|e| invalid(format!("{INVALID_SIGNATURE} ({e})")))?;
    if bool::from(expected.as_bytes().ct_eq(claim.signature.as_bytes())) {
        Ok(claim.access_key_id)
    } else {
        Err(invalid(INVALID_SIGNATURE.to_owned()))
    }
}

/// The signature AWS's signer gives the request at its own date, region and header set.
fn expected_signature(
    method: &str,
    uri: &str,
    headers: Vec<(&str, &str)>,
    body: &[u8],
    claim: &Claim,
    signed_at: SystemTime,
    secret: &str,
) -> Result<String, String> {
    let identity: Identity =
        Credentials::new(&claim.access_key_id, secret, None, None, "sluice-principal").into();
    let mut settings = SigningSettings::default();
    // Exactly the headers the client listed are handed to the signer: none is left out.
    settings.excluded_headers = None;
    if let Some((_, expires)) = claim.presigned {
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(Duration::from_secs(expires));
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&claim.region)
        .name(SERVICE)
        .time(signed_at)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable =
        SignableRequest::new(method, uri, headers.into_iter(), SignableBody::Bytes(body))
            .map_err(|e| e.to_string())?;
    let output = sign(signable, &params).map_err(|e| e.to_string())?;
    Ok(output.signature().to_owned())
}

fn parse_amz_date(text: &str) -> Option<SystemTime> {
    if text.len() != 16 {
        return None;
    }
    let naive = NaiveDateTime::parse_from_str(text, "%Y%m%dT%H%M%SZ").ok()?;
    Some(SystemTime::from(naive.and_utc()))
}

fn format_amz_date(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// AWS's clock checks: a header signature within five minutes either way; a presigned URL
/// from five minutes before its date until its expiry.
fn check_time(signed_at: SystemTime, claim: &Claim, now: SystemTime) -> Result<(), String> {
    let (earliest, latest) = match claim.presigned {
        None => (
            now.checked_sub(MAX_SKEW).unwrap_or(SystemTime::UNIX_EPOCH),
            now + MAX_SKEW,
        ),
        Some((_, expires)) => {
            let expiry = signed_at + Duration::from_secs(expires);
            if now > expiry {
                return Err(format!(
                    "Signature expired: {} is now earlier than {} ({} - {expires} sec.)",
                    format_amz_date(expiry),
                    format_amz_date(now),
                    format_amz_date(now),
                ));
            }
            (SystemTime::UNIX_EPOCH, now + MAX_SKEW)
        }
    };
    if signed_at < earliest {
        return Err(format!(
            "Signature expired: {} is now earlier than {} ({} - 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(earliest),
            format_amz_date(now)
        ));
    }
    if signed_at > latest {
        return Err(format!(
            "Signature not yet current: {} is still later than {} ({} + 5 min.)",
            format_amz_date(signed_at),
            format_amz_date(latest),
            format_amz_date(now)
        ));
    }
    Ok(())
}

/// The fuzz target's entry: `data` as an `Authorization` header (and, split at its first
/// newline, as a query string) on an Invoke request, checked against one known key. Every
/// outcome must be a refusal; none may panic.
pub fn fuzz_authorization(data: &[u8]) -> Result<String, AuthError> {
    struct One;
    impl Keys for One {
        fn secret(&self, access_key_id: &str) -> Option<&str> {
            (access_key_id == "AKIASLUICEFUZZ0001").then_some("fuzz-secret")
        }
    }
    let text = String::from_utf8_lossy(data);
    let (header, query) = text.split_once('\n').unwrap_or((&text, ""));
    let mut headers = HeaderMap::new();
    headers.insert("host", http::HeaderValue::from_static("127.0.0.1:9000"));
    headers.insert(
        "x-amz-date",
        http::HeaderValue::from_static("20260101T000000Z"),
    );
    if let Ok(v) = http::HeaderValue::from_str(header) {
        headers.insert("authorization", v);
    }
    let request = Request {
        method: &Method::POST,
        path: "/2015-03-31/functions/f/invocations",
        query: (!query.is_empty()).then_some(query),
        headers: &headers,
        body: b"{}",
    };
    let now = parse_amz_date("20260101T000100Z").unwrap_or(SystemTime::UNIX_EPOCH);
    verify(&request, &One, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sigv4::http_request::SigningParams;

    struct TestKeys;
    impl Keys for TestKeys {
        fn secret(&self, access_key_id: &str) -> Option<&str> {
            (access_key_id == "AKIDEXAMPLE0000001")
                .then_some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
        }
    }

    /// Signs a request with aws-sigv4 as a client would (headers or query), returning the
    /// headers and query to send.
    fn client_sign(
        method: &str,
        path_query: &str,
        body: &[u8],
        secret: &str,
        at: SystemTime,
        presign: Option<u64>,
    ) -> (HeaderMap, String) {
        let identity: Identity =
            Credentials::new("AKIDEXAMPLE0000001", secret, None, None, "t").into();
        let mut settings = SigningSettings::default();
        if let Some(secs) = presign {
            settings.signature_location = SignatureLocation::QueryParams;
            settings.expires_in = Some(Duration::from_secs(secs));
        }
        let params: SigningParams<'_> = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("lambda")
            .time(at)
            .settings(settings)
            .build()
            .expect("valid test input")
            .into();
        let uri = format!("http://127.0.0.1:9000{path_query}");
        let mut req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("host", "127.0.0.1:9000")
            .header("content-type", "application/json")
            .body(())
            .expect("valid test input");
        let signable = SignableRequest::new(
            method,
            uri.clone(),
            req.headers()
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().expect("valid test input"))),
            SignableBody::Bytes(body),
        )
        .expect("valid test input");
        let (instructions, _) = sign(signable, &params)
            .expect("valid test input")
            .into_parts();
        instructions.apply_to_request_http1x(&mut req);
        let q = req.uri().query().map(str::to_owned).unwrap_or_default();
        (req.headers().clone(), q)
    }

    fn check(
        headers: &HeaderMap,
        path: &str,
        query: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<String, AuthError> {
        verify(
            &Request {
                method: &Method::POST,
                path,
                query: (!query.is_empty()).then_some(query),
                headers,
                body,
            },
            &TestKeys,
            now,
        )
    }

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const PATH: &str = "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Af/invocations";

    #[test]
    fn a_request_signed_with_the_right_key_verifies_and_a_changed_body_does_not() {
        let now = SystemTime::now();
        let (headers, _) = client_sign("POST", PATH, b"{\"a\":1}", SECRET, now, None);
        assert_eq!(
            check(&headers, PATH, "", b"{\"a\":1}", now),
            Ok("AKIDEXAMPLE0000001".to_owned())
        );
        let err = check(&headers, PATH, "", b"{\"a\":2}", now).expect_err("refused");
        assert_eq!(err.code(), "InvalidSignatureException");
        assert_eq!(err.to_string(), INVALID_SIGNATURE);
    }

    #[test]
    fn a_wrong_secret_is_an_invalid_signature_and_an_unknown_key_unrecognized() {
        let now = SystemTime::now();
        let (headers, _) = client_sign("POST", PATH, b"{}", "not-the-secret", now, None);
        assert_eq!(
            check(&headers, PATH, "", b"{}", now)
                .expect_err("refused")
                .code(),
            "InvalidSignatureException"
        );
        let mut other = headers.clone();
        let auth = headers["authorization"]
            .to_str()
            .expect("valid test input")
            .replace("AKIDEXAMPLE0000001", "AKIDUNKNOWN0000001");
        other.insert("authorization", auth.parse().expect("valid test input"));
        let err = check(&other, PATH, "", b"{}", now).expect_err("refused");
        assert_eq!(err.code(), "UnrecognizedClientException");
        assert_eq!(
            err.to_string(),
            "The security token included in the request is invalid."
        );
    }

    #[test]
    fn a_date_more_than_five_minutes_off_is_refused_with_aws_message() {
        let now = parse_amz_date("20260101T120000Z").expect("valid test input");
        let then = parse_amz_date("20260101T115400Z").expect("valid test input");
        let (headers, _) = client_sign("POST", PATH, b"{}", SECRET, then, None);
        let err = check(&headers, PATH, "", b"{}", now).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "Signature expired: 20260101T115400Z is now earlier than 20260101T115500Z (20260101T120000Z - 5 min.)"
        );
        let later = parse_amz_date("20260101T120600Z").expect("valid test input");
        let (headers, _) = client_sign("POST", PATH, b"{}", SECRET, later, None);
        let err = check(&headers, PATH, "", b"{}", now).expect_err("refused");
        assert!(
            err.to_string().starts_with(
                "Signature not yet current: 20260101T120600Z is still later than 20260101T120500Z"
            ),
            "{err}"
        );
        // Within the window both ways.
        let near = parse_amz_date("20260101T115600Z").expect("valid test input");
        let (headers, _) = client_sign("POST", PATH, b"{}", SECRET, near, None);
        assert!(check(&headers, PATH, "", b"{}", now).is_ok());
    }

    #[test]
    fn a_presigned_query_verifies_until_it_expires() {
        let at = parse_amz_date("20260101T120000Z").expect("valid test input");
        let (mut headers, query) = client_sign(
            "POST",
            "/2015-03-31/functions/f/invocations?Qualifier=live",
            b"",
            SECRET,
            at,
            Some(60),
        );
        headers.remove("authorization");
        assert!(query.contains("X-Amz-Signature="), "{query}");
        let path = "/2015-03-31/functions/f/invocations";
        assert!(check(&headers, path, &query, b"", at + Duration::from_secs(30)).is_ok());
        let err =
            check(&headers, path, &query, b"", at + Duration::from_secs(61)).expect_err("refused");
        assert!(err.to_string().starts_with("Signature expired"), "{err}");
        let tampered = query.replace("Qualifier=live", "Qualifier=prod");
        assert_eq!(
            check(&headers, path, &tampered, b"", at)
                .expect_err("refused")
                .code(),
            "InvalidSignatureException"
        );
    }

    #[test]
    fn unsigned_and_malformed_requests_are_refused_without_panicking() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "h".parse().expect("valid test input"));
        assert_eq!(
            check(&headers, PATH, "", b"", SystemTime::now()),
            Err(AuthError::Missing)
        );
        for bad in [
            "",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=a/b",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE0000001/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE0000001/20260101/us-east-1/lambda/aws4_request, SignedHeaders=x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000",
            "Basic dXNlcjpwYXNz",
            "AWS4-HMAC-SHA256 Credential=====,,,,",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad:?}");
            assert!(fuzz_authorization(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let long = "A".repeat(100_000);
        assert!(fuzz_authorization(long.as_bytes()).is_err());
        assert!(fuzz_authorization("x\nX-Amz-Signature=&X-Amz-Signature=".as_bytes()).is_err());
        assert!(fuzz_authorization("x\nX-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASLUICEFUZZ0001%2F20260101%2Fus-east-1%2Flambda%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=0000000000000000000000000000000000000000000000000000000000000000".as_bytes()).is_err());
    }

    #[test]
    fn another_service_in_the_scope_is_refused() {
        let c = parse_authorization("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE0000001/20260101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000").expect("valid test input");
        assert_eq!(c.service, "s3");
        assert_eq!(c.signed_headers, ["host", "x-amz-date"]);
    }
}
