//! A deployed function's settings, from a deploy's query parameters over the server's defaults:
//! how it is served (mode, pool, concurrency, queue, timeout, extra devices), and what a bare
//! `.wasm` is packed with (memory, fuel, env, args, service connections). A bundle carries the
//! latter itself.

use std::collections::BTreeMap;

use abi::bundle::Connection;
use serde::{Deserialize, Serialize};

use crate::pack::BundleSettings;
use host_vmm::Mode;

/// Why a deploy's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A parameter's value is not allowed.
    #[error("query parameter {key}={value:?}: {reason}")]
    Invalid {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// A parameter no deploy takes.
    #[error(
        "query parameter {0:?} is not a deploy setting (mode, pool, concurrency, queue, timeout_ms, init_timeout_ms, devices, memory, fuel, env, arg, connect, init_until_read)"
    )]
    Unknown(String),
    /// A packing parameter given with a bundle, which carries its own.
    #[error("{0} is set in the bundle itself: repack the bundle, or deploy the bare .wasm with {0}")]
    InBundle(String),
    /// The query string is not `key=value&…`.
    #[error("the query string is not key=value pairs: {0}")]
    Query(serde_urlencoded::de::Error),
}

/// How a deployed function is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// Where each request's VM comes from.
    pub mode: Mode,
    /// VMs parked ahead (pool mode).
    pub pool: usize,
    /// Requests served at once, each on a vCPU thread of its own.
    pub concurrency: usize,
    /// Requests waiting beyond those; past it a request gets 429.
    pub queue: usize,
    /// Wall-clock limit per request, in milliseconds; past it the request gets 504.
    pub timeout_ms: u64,
    /// Wall-clock limit for the deploy's cold boot and init, and for readying each VM restored
    /// from its snapshot (a request's limit may be far shorter), in milliseconds.
    #[serde(default = "default_init_timeout_ms")]
    pub init_timeout_ms: u64,
    /// Devices its VMs have beyond those its bundle implies (`entropy`). They are taken into
    /// its snapshot, so they are part of its version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// The host service each vsock port it connects to reaches, by the name `thaw serve
    /// --service NAME=SOCKET` gave it: the bundle's connections, not a deploy parameter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<u32, String>,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            mode: Mode::Reset,
            pool: 2,
            concurrency: 2,
            queue: 64,
            timeout_ms: 10_000,
            init_timeout_ms: default_init_timeout_ms(),
            devices: Vec::new(),
            services: BTreeMap::new(),
        }
    }
}

/// The init limit of a function stored before it was a setting: the 60 s it had then.
fn default_init_timeout_ms() -> u64 {
    60_000
}

/// What a bare `.wasm` is packed with; unset values take `thaw pack`'s defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packing {
    /// Most linear memory, in MiB.
    pub memory_mib: Option<u32>,
    /// Instruction budget per invocation.
    pub fuel: Option<u64>,
    /// `K=V` environment entries.
    pub env: Vec<String>,
    /// Arguments after the name.
    pub args: Vec<String>,
    /// Host services it connects to (`NAME=PORT`, as `thaw pack --connect`).
    pub connections: Vec<Connection>,
    /// A command's start-up, up to its first read of stdin, is its init (as `thaw pack
    /// --init-until-read`).
    pub init_until_read: bool,
}

impl Packing {
    /// The first packing parameter given, if any (a bundle must have none).
    pub fn first_given(&self) -> Option<&'static str> {
        if self.memory_mib.is_some() {
            Some("memory")
        } else if self.fuel.is_some() {
            Some("fuel")
        } else if !self.env.is_empty() {
            Some("env")
        } else if !self.args.is_empty() {
            Some("arg")
        } else if !self.connections.is_empty() {
            Some("connect")
        } else if self.init_until_read {
            Some("init_until_read")
        } else {
            None
        }
    }

    /// The bundle settings for a function deployed as `name`.
    pub fn bundle_settings(&self, name: &str) -> BundleSettings {
        BundleSettings {
            name: name.to_string(),
            memory_mib: self.memory_mib.unwrap_or(16),
            fuel: self.fuel,
            env: self.env.clone(),
            args: self.args.clone(),
            connections: self.connections.clone(),
            sample_request: None,
            scratch_mib: abi::bundle::DEFAULT_SCRATCH_MIB,
            scratch_dirs: crate::pack::default_scratch_dirs(),
            data_mount: abi::bundle::DEFAULT_DATA_MOUNT.into(),
            init_until_read: self.init_until_read,
        }
    }
}

/// Most VMs a function may keep parked or serving at once.
const MAX_VMS: usize = 64;
/// Most requests one function may queue.
const MAX_QUEUE: usize = 65_536;
/// Longest timeout a request may have: an hour.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// Parses a deploy's query string (`mode=pool&concurrency=4&env=K=V&env=…`) over `defaults`.
pub fn parse(query: &str, defaults: &Serving) -> Result<(Serving, Packing), SettingsError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(SettingsError::Query)?;
    let mut serving = defaults.clone();
    let mut packing = Packing::default();
    for (key, value) in pairs {
        let invalid =
            |reason: &str| SettingsError::Invalid { key: key.clone(), value: value.clone(), reason: reason.into() };
        let count = |max: usize, min: usize| {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| invalid(&format!("a whole number from {min} to {max}")))
        };
        match key.as_str() {
            "mode" => serving.mode = value.parse::<Mode>().map_err(|_| invalid("one of reset, pool, fresh"))?,
            "pool" => serving.pool = count(MAX_VMS, 1)?,
            "concurrency" => serving.concurrency = count(MAX_VMS, 1)?,
            "queue" => serving.queue = count(MAX_QUEUE, 0)?,
            "timeout_ms" => serving.timeout_ms = count(MAX_TIMEOUT_MS as usize, 1)? as u64,
            "init_timeout_ms" => serving.init_timeout_ms = count(MAX_TIMEOUT_MS as usize, 1)? as u64,
            "memory" => {
                packing.memory_mib =
                    Some(value.parse().ok().filter(|m| *m >= 1).ok_or_else(|| invalid("a number of MiB"))?)
            }
            "fuel" => packing.fuel = Some(value.parse().map_err(|_| invalid("a whole number of instructions"))?),
            "env" if value.contains('=') => packing.env.push(value),
            "env" => return Err(invalid("K=V")),
            "arg" => packing.args.push(value),
            "init_until_read" => {
                packing.init_until_read = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(invalid("true or false")),
                }
            }
            "connect" => {
                packing.connections.push(crate::pack::parse_connection(&value).map_err(|e| invalid(&e.to_string()))?)
            }
            "devices" => {
                let mut devices = Vec::new();
                for device in value.split(',') {
                    match device {
                        "entropy" => devices.push(device.to_string()),
                        _ => {
                            return Err(invalid(
                                "a list of: entropy (a data volume brings a block device, and connections vsock)",
                            ));
                        }
                    }
                }
                devices.sort();
                devices.dedup();
                serving.devices = devices;
            }
            _ => return Err(SettingsError::Unknown(key)),
        }
    }
    Ok((serving, packing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_override_the_defaults_and_repeat_where_they_are_lists() {
        let (serving, packing) =
            parse("mode=pool&pool=3&queue=0&timeout_ms=2500&init_timeout_ms=90000&env=A%3D1&env=B=2&arg=x&memory=32&connect=db=5000&devices=entropy,entropy", &Serving::default())
                .unwrap();
        let devices = vec!["entropy".to_string()];
        let expected = Serving {
            mode: Mode::Pool,
            pool: 3,
            queue: 0,
            timeout_ms: 2500,
            init_timeout_ms: 90_000,
            devices,
            ..Serving::default()
        };
        assert_eq!(serving, expected);
        assert_eq!(packing.connections, [Connection { name: "db".into(), port: 5000 }]);
        assert_eq!(packing.env, ["A=1", "B=2"]);
        assert_eq!(packing.args, ["x"]);
        assert_eq!(packing.memory_mib, Some(32));
        assert_eq!(packing.first_given(), Some("memory"));
        assert_eq!(parse("", &Serving::default()).unwrap(), (Serving::default(), Packing::default()));
        let (_, packing) = parse("init_until_read=true", &Serving::default()).unwrap();
        assert!(packing.bundle_settings("f").init_until_read);
        assert_eq!(packing.first_given(), Some("init_until_read"));
        let (_, packing) = parse("init_until_read=0", &Serving::default()).unwrap();
        assert_eq!(packing, Packing::default());
    }

    #[test]
    fn bad_parameters_get_one_line_naming_them() {
        let error = |q: &str| parse(q, &Serving::default()).unwrap_err().to_string();
        assert_eq!(error("mode=warm"), r#"query parameter mode="warm": one of reset, pool, fresh"#);
        assert_eq!(error("concurrency=0"), r#"query parameter concurrency="0": a whole number from 1 to 64"#);
        assert_eq!(error("timeout_ms=-1"), r#"query parameter timeout_ms="-1": a whole number from 1 to 3600000"#);
        assert_eq!(
            error("init_timeout_ms=0"),
            r#"query parameter init_timeout_ms="0": a whole number from 1 to 3600000"#
        );
        assert_eq!(error("env=NOEQUALS"), r#"query parameter env="NOEQUALS": K=V"#);
        assert!(error("path=../../etc").starts_with(r#"query parameter "path" is not a deploy setting"#));
        assert!(error("devices=console").starts_with(r#"query parameter devices="console": a list of: entropy"#));
        assert_eq!(error("init_until_read=yes"), r#"query parameter init_until_read="yes": true or false"#);
        assert!(error("connect=db").contains(r#""db" is not NAME=PORT"#), "{}", error("connect=db"));
    }
}
