//! What a function may reach: the execution roles under `roles:` whose keys a function gets
//! (`role:`), the user it runs as (`run_as:`), and its network (`network:`). Decoded here
//! and checked for what the file alone can tell; user and group names are resolved when Sluice
//! starts, since loading stays pure.

use std::collections::BTreeMap;
use std::path::Path;

use crate::decode::{Decoder, Entry, Field, Fields, Names, child};
use crate::schema::with_suggestion;
use crate::secret::{Secret, secret};

const ROLE_KEYS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "secret_file",
    "session_token",
    "session_token_file",
];
const RUN_AS_KEYS: &[&str] = &["user", "group"];
const NETWORKS: &[&str] = &["host", "none"];

/// An execution role: AWS credentials handed to the functions that name it, as
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleConfig {
    pub access_key_id: String,
    /// `secret_access_key` (normally `${ENV}`) or the content of `secret_file`.
    pub secret_access_key: Secret,
    /// `session_token` or the content of `session_token_file`, for temporary credentials.
    pub session_token: Option<Secret>,
}

/// `run_as: { user, group }`: names or numeric ids, resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    /// Default: the user's primary group (for a numeric user, the group of the same number).
    pub group: Option<String>,
}

/// `network`: `host` (the default, the host's network as Lambda's functions without a VPC
/// have the internet) or `none` (loopback only, with the function's Runtime API on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    #[default]
    Host,
    None,
}

/// The entries of the `roles:` section (`section_path`), decoded.
pub(crate) fn decode_roles(
    d: &mut Decoder<'_>,
    entries: &[Entry<'_>],
    section_path: &str,
    base_dir: &Path,
) -> BTreeMap<String, RoleConfig> {
    let mut roles = BTreeMap::new();
    for entry in entries {
        let path = child(section_path, entry.key);
        let Some(fields) = d.mapping(entry.value, &path, Some(ROLE_KEYS)) else {
            continue;
        };
        let access_key_id = d.string(&fields, "access_key_id");
        let secret_access_key = secret(d, &fields, "secret_access_key", "secret_file", base_dir);
        let session_token = secret(d, &fields, "session_token", "session_token_file", base_dir);
        let access_key_id = match access_key_id {
            Field::Value(id) if id.is_empty() => {
                d.error(&fields.path_of("access_key_id"), "must not be empty");
                None
            }
            Field::Value(id) => Some(id),
            Field::Absent => {
                d.error(&path, "missing field `access_key_id`");
                None
            }
            Field::Invalid => None,
        };
        let secret_access_key = match secret_access_key {
            Field::Value(secret) => Some(secret),
            Field::Absent => {
                d.error(
                    &path,
                    "missing field `secret_access_key` (or `secret_file`)",
                );
                None
            }
            Field::Invalid => None,
        };
        let session_token = session_token.ok();
        if let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret_access_key) {
            roles.insert(
                entry.key.to_owned(),
                RoleConfig {
                    access_key_id,
                    secret_access_key,
                    session_token,
                },
            );
        }
    }
    roles
}

/// A function's `role:`: the name of a role under `roles:`.
pub(crate) fn decode_role_reference(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    roles: &Names<'_>,
) -> Option<String> {
    let role = d.string(fields, "role").ok()?;
    if roles.contains(&role) {
        return Some(role);
    }
    d.error(
        &fields.path_of("role"),
        with_suggestion(
            format!("unknown role `{role}`: it is not declared under `roles`"),
            &role,
            roles.as_slice(),
        ),
    );
    None
}

/// A function's `run_as: { user, group }`.
pub(crate) fn decode_run_as(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Option<RunAs> {
    let node = fields.get("run_as")?;
    let path = fields.path_of("run_as");
    let run_as = d.mapping(node, &path, Some(RUN_AS_KEYS))?;
    let name = |d: &mut Decoder<'_>, key: &str| match run_as.get(key) {
        Some(node) => {
            let at = run_as.path_of(key);
            match d.text_node(node, &at, "a user or group name or number") {
                Field::Value(text) if text.is_empty() => {
                    d.error(&at, "must not be empty");
                    Field::Invalid
                }
                other => other,
            }
        }
        None => Field::Absent,
    };
    let user = name(d, "user");
    let group = name(d, "group");
    let user = match user {
        Field::Value(user) => user,
        Field::Absent => {
            d.error(&path, "missing field `user`");
            return None;
        }
        Field::Invalid => return None,
    };
    Some(RunAs {
        user,
        group: group.ok(),
    })
}

/// A function's `network`.
pub(crate) fn decode_network(d: &mut Decoder<'_>, fields: &Fields<'_>) -> Network {
    d.parse(fields, "network", "a network", |text| match text {
        "host" => Ok(Network::Host),
        "none" => Ok(Network::None),
        other => Err(with_suggestion(
            format!(
                "unknown network `{other}`, expected one of: {}",
                NETWORKS.join(", ")
            ),
            other,
            NETWORKS,
        )),
    })
    .or(Network::Host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_names_a_role_whose_secrets_come_from_env_and_file_and_a_user_and_network() {
        let dir = tempfile::tempdir().expect("test setup");
        std::fs::write(dir.path().join("token"), "session-token\n").expect("test setup");
        let env = |name: &str| (name == "READER_SECRET").then(|| "reader-secret".to_owned());
        let config = crate::parse_str(
            "roles:\n  reader:\n    access_key_id: AKIAREADER\n    secret_access_key: ${READER_SECRET}\n    session_token_file: token\nfunctions:\n  f:\n    package: p\n    role: reader\n    run_as: { user: 1234, group: staff }\n    network: none\n  g:\n    package: p\n",
            "test.yaml",
            dir.path(),
            &env,
        )
        .expect("test setup");
        let role = &config.roles["reader"];
        assert_eq!(role.access_key_id, "AKIAREADER");
        assert_eq!(role.secret_access_key.expose(), "reader-secret");
        assert_eq!(
            role.session_token.as_ref().map(Secret::expose),
            Some("session-token")
        );
        let f = &config.functions["f"];
        assert_eq!(f.role.as_deref(), Some("reader"));
        assert_eq!(
            f.run_as,
            Some(RunAs {
                user: "1234".to_owned(),
                group: Some("staff".to_owned())
            })
        );
        assert_eq!(f.network, Network::None);
        let g = &config.functions["g"];
        assert_eq!(
            (&g.role, &g.run_as, g.network),
            (&None, &None, Network::Host)
        );
        // The configuration printed for debugging never shows a secret.
        assert!(!format!("{config:?}").contains("reader-secret"));
    }
}
