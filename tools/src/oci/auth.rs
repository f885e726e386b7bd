//! Logging in to a registry as `docker login` leaves it: the credentials in Docker's
//! `config.json`, and the two challenges a registry answers 401 with (`WWW-Authenticate`):
//! `Basic`, answered with the credentials themselves, and `Bearer`, the distribution spec's token
//! auth, answered by asking the challenge's realm for a token with them (or anonymously). The
//! requests themselves are `mod.rs`'s; this holds what they are built from.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a registry's credentials or challenge could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Docker's configuration could not be read or is not what Docker writes.
    #[error("{}: {why}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The registry asks for credentials that only a credential helper holds.
    #[error(
        "{registry} asks for credentials, which {} keeps in the credential helper docker-credential-{helper}; thaw does not run helpers: log in with `docker login {registry}` after removing credsStore/credHelpers, or write its \"auths\" entry",
        path.display()
    )]
    Helper {
        /// The registry.
        registry: String,
        /// The helper's name.
        helper: String,
        /// The file that names it.
        path: PathBuf,
    },
    /// The registry asks for credentials and there are none for it.
    #[error("{registry} asks for credentials and {} has none for it: run `docker login {registry}`", path.display())]
    NoCredentials {
        /// The registry.
        registry: String,
        /// Where they were looked for.
        path: PathBuf,
    },
    /// The registry's challenge does not parse.
    #[error("{registry} answered 401 with a WWW-Authenticate thaw cannot read: {header:?}")]
    Challenge {
        /// The registry.
        registry: String,
        /// The header's start.
        header: String,
    },
    /// The token service refused, or answered without a token.
    #[error("{realm}: {why}")]
    Token {
        /// The realm.
        realm: String,
        /// What was wrong.
        why: String,
    },
}

/// A user name and password (or a registry's access token as the password).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `Authorization` header value of Basic auth with them.
    pub fn basic(&self) -> String {
        format!("Basic {}", STANDARD.encode(format!("{}:{}", self.username, self.password)))
    }
}

/// What Docker's configuration says about one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Credentials in its `auths`.
    Credentials(Credentials),
    /// None there, but a credential helper holds them (`credHelpers`, or `credsStore` for all).
    Helper(String),
    /// Nothing.
    None,
}

/// Docker's configuration file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// What the configuration at `path` holds for `registry` (`host[:port]`); a file that is not
/// there holds nothing.
pub fn login(path: &Path, registry: &str) -> Result<Login, AuthError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Login::None),
        Err(e) => return Err(AuthError::Config { path: path.to_path_buf(), why: e.to_string() }),
    };
    login_in(&text, registry).map_err(|why| AuthError::Config { path: path.to_path_buf(), why })
}

/// [`login`] of the configuration `text`.
fn login_in(text: &[u8], registry: &str) -> Result<Login, String> {
    let config: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let auths = config["auths"].as_object();
    // Docker keys its logins by host, or by a URL of it (`https://host/v1/` and the like).
    let entry = auths.and_then(|auths| {
        auths.iter().find(|(key, _)| {
            let host = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
            host.split('/').next() == Some(registry)
        })
    });
    if let Some((key, entry)) = entry {
        let field = |name: &str| entry[name].as_str().filter(|s| !s.is_empty());
        if let Some(auth) = field("auth") {
            let decoded = STANDARD.decode(auth).map_err(|e| format!("auths.{key:?}.auth is not base64: {e}"))?;
            let decoded = String::from_utf8(decoded).map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
            let (username, password) =
                decoded.split_once(':').ok_or_else(|| format!("auths.{key:?}.auth is not base64 of USER:PASSWORD"))?;
            return Ok(Login::Credentials(Credentials { username: username.into(), password: password.into() }));
        }
        if let (Some(username), Some(password)) = (field("username"), field("password")) {
            return Ok(Login::Credentials(Credentials { username: username.into(), password: password.into() }));
        }
        if field("identitytoken").is_some() {
            return Err(format!(
                "auths.{key:?} holds an identity token (an OAuth refresh token), which thaw does not use: log in with a password or access token"
            ));
        }
    }
    let helper = config["credHelpers"][registry].as_str().or_else(|| config["credsStore"].as_str());
    Ok(helper.filter(|h| !h.is_empty()).map_or(Login::None, |h| Login::Helper(h.to_string())))
}

/// A registry's `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Send the credentials themselves.
    Basic,
    /// Get a token from `realm` for `service` and `scope`, and send it.
    Bearer {
        /// The token service's URL.
        realm: String,
        /// The registry's name at the token service.
        service: Option<String>,
        /// What the token must allow, e.g. `repository:functions/hello:pull,push`.
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `header` (`Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`), from
    /// `registry` (which errors name).
    pub fn parse(header: &str, registry: &str) -> Result<Self, AuthError> {
        let bad =
            || AuthError::Challenge { registry: registry.to_string(), header: header.chars().take(200).collect() };
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(Self::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(bad());
        }
        let parameters = parameters(rest).ok_or_else(bad)?;
        let get = |name: &str| parameters.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        let realm = get("realm").filter(|r| r.starts_with("http://") || r.starts_with("https://")).ok_or_else(bad)?;
        Ok(Self::Bearer { realm, service: get("service"), scope: get("scope") })
    }

    /// The URL a Bearer challenge's token is asked for at.
    pub fn token_url(realm: &str, service: Option<&str>, scope: Option<&str>) -> String {
        let query: Vec<(&str, &str)> =
            [("service", service), ("scope", scope)].into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
        let query = serde_urlencoded::to_string(query).unwrap_or_default();
        match (query.is_empty(), realm.contains('?')) {
            (true, _) => realm.to_string(),
            (false, true) => format!("{realm}&{query}"),
            (false, false) => format!("{realm}?{query}"),
        }
    }
}

/// The `name=value` pairs of a challenge, values quoted (with `\` escapes) or bare.
fn parameters(mut rest: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            return Some(pairs);
        }
        let (name, after) = rest.split_once('=')?;
        let name = name.trim();
        if name.is_empty() || name.contains([' ', '"']) {
            return None;
        }
        let mut value = String::new();
        if let Some(quoted) = after.strip_prefix('"') {
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => value.push(chars.next()?.1),
                    (at, '"') => break at,
                    (_, c) => value.push(c),
                }
            };
            rest = &quoted[end + 1..];
        } else {
            let end = after.find(',').unwrap_or(after.len());
            value.push_str(after[..end].trim());
            rest = &after[end..];
        }
        pairs.push((name.to_string(), value));
    }
}

/// The token in a token service's answer (`token`, or OAuth's `access_token`).
pub fn token_of(body: &[u8], realm: &str) -> Result<String, AuthError> {
    let bad =
        |why: String| AuthError::Token { realm: realm.to_string(), why: format!("the token service's answer {why}") };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(format!("is not JSON: {e}")))?;
    let token = value["token"].as_str().or_else(|| value["access_token"].as_str()).unwrap_or_default();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("has no \"token\" or \"access_token\" of printable characters".into()));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_found_by_host_in_any_form_docker_writes() {
        let auth = STANDARD.encode("ada:s3cret:with:colons");
        let config = serde_json::json!({
            "auths": {
                "127.0.0.1:5000": { "auth": auth },
                "https://registry.example/v1/": { "username": "bob", "password": "pw" },
                "tokens.example": { "identitytoken": "refresh" },
                "broken.example": { "auth": "%%%" },
            },
            "credHelpers": { "ecr.example": "ecr-login" },
        })
        .to_string();
        let found = |registry| login_in(config.as_bytes(), registry);
        let ada = Credentials { username: "ada".into(), password: "s3cret:with:colons".into() };
        assert_eq!(found("127.0.0.1:5000").unwrap(), Login::Credentials(ada.clone()));
        assert_eq!(ada.basic(), format!("Basic {}", STANDARD.encode("ada:s3cret:with:colons")));
        let bob = Credentials { username: "bob".into(), password: "pw".into() };
        assert_eq!(found("registry.example").unwrap(), Login::Credentials(bob));
        assert_eq!(found("ecr.example").unwrap(), Login::Helper("ecr-login".into()));
        assert_eq!(found("127.0.0.1:5001").unwrap(), Login::None);
        assert!(found("tokens.example").unwrap_err().contains("identity token"));
        assert!(found("broken.example").unwrap_err().contains("not base64"));
        assert!(login_in(b"{", "x").unwrap_err().contains("not JSON"));
        let store = r#"{"auths": {}, "credsStore": "desktop"}"#;
        assert_eq!(login_in(store.as_bytes(), "any.example").unwrap(), Login::Helper("desktop".into()));
        assert!(!format!("{ada:?}").contains("s3cret"), "Debug shows no password");
    }

    #[test]
    fn challenges_parse_as_registries_send_them() {
        let bearer = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
            "r",
        )
        .unwrap();
        assert_eq!(
            bearer,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(Challenge::parse(r#"basic realm="Registry Realm""#, "r").unwrap(), Challenge::Basic);
        let escaped = Challenge::parse(r#"Bearer realm="http://127.0.0.1:1/t", service=a\ b, scope="x\"y""#, "r");
        assert_eq!(
            escaped.unwrap(),
            Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some(r"a\ b".into()),
                scope: Some("x\"y".into())
            }
        );
        for bad in
            ["Negotiate abc", r#"Bearer service="x""#, r#"Bearer realm="file:///etc/passwd""#, r#"Bearer realm="x"#, ""]
        {
            let e = Challenge::parse(bad, "reg.example").unwrap_err().to_string();
            assert!(e.starts_with("reg.example answered 401 with a WWW-Authenticate"), "{bad}: {e}");
        }
        assert_eq!(
            Challenge::token_url("https://a.example/token", Some("reg"), Some("repository:a/b:pull,push")),
            "https://a.example/token?service=reg&scope=repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(
            Challenge::token_url("https://a.example/t?x=1", Some("s"), None),
            "https://a.example/t?x=1&service=s"
        );
        assert_eq!(Challenge::token_url("https://a.example/t", None, None), "https://a.example/t");
    }

    #[test]
    fn a_token_answer_must_hold_a_token() {
        assert_eq!(token_of(br#"{"token": "abc.def"}"#, "r").unwrap(), "abc.def");
        assert_eq!(token_of(br#"{"access_token": "xyz"}"#, "r").unwrap(), "xyz");
        for bad in [&br#"{}"#[..], br#"{"token": ""}"#, br#"{"token": "a\nb"}"#, b"<html>"] {
            assert!(token_of(bad, "https://a.example/t").unwrap_err().to_string().starts_with("https://a.example/t:"));
        }
    }
}
