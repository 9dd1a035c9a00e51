//! The hook's settings: TCPMIG_* variables (CRIU passes its environment to action scripts), over
//! a file of the same KEY=VALUE lines, since podman and runc do not let every variable through.
use std::{
    collections::HashMap,
    net::{AddrParseError, IpAddr, SocketAddr},
    num::{ParseFloatError, ParseIntError},
    path::{Path, PathBuf},
    time::Duration,
};

use super::CriuError;

/// Names the configuration file.
pub const CONFIG_ENV: &str = "TCPMIG_CONFIG";
/// Read when it exists and TCPMIG_CONFIG is not set.
pub const DEFAULT_CONFIG: &str = "/etc/tcpmig/criu-hook.conf";

const KEYS: [&str; 5] = [
    "TCPMIG_DEV",
    "TCPMIG_SERVICES",
    "TCPMIG_ADDRESS",
    "TCPMIG_DEADLINE",
    "TCPMIG_REPORT",
];
const DEFAULT_DEV: &str = "eth0";
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// A setting the hook cannot use; each names the key and what to give instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{line:?} is not KEY=VALUE")]
    NotKeyValue { line: String },
    #[error("unknown key {key}: the keys are {}", KEYS.join(", "))]
    UnknownKey { key: String },
    #[error("TCPMIG_SERVICES: {service:?} is not ADDR:PORT")]
    Service {
        service: String,
        source: AddrParseError,
    },
    #[error("TCPMIG_ADDRESS={value:?}: give ADDR/PREFIX")]
    AddressForm { value: String },
    #[error("TCPMIG_ADDRESS={value:?}: give ADDR/PREFIX")]
    AddressIp {
        value: String,
        source: AddrParseError,
    },
    #[error("TCPMIG_ADDRESS={value:?}: give ADDR/PREFIX")]
    AddressPrefix {
        value: String,
        source: ParseIntError,
    },
    /// Not a number (the source says why), or not a positive finite one (no source).
    #[error("{key}={value:?}: give a positive number of seconds")]
    Seconds {
        key: &'static str,
        value: String,
        #[source]
        source: Option<ParseFloatError>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// TCPMIG_DEV: the interface carrying the connections, on both hosts (default eth0).
    pub dev: String,
    /// TCPMIG_SERVICES=ADDR:PORT,...: freeze these services whole (new SYNs too) instead of the
    /// dumped tree's 4-tuples.
    pub services: Vec<SocketAddr>,
    /// TCPMIG_ADDRESS=ADDR/PREFIX: the hook moves this address itself (deleted from the source at
    /// post-dump, added on the destination while frozen).
    pub address: Option<(IpAddr, u8)>,
    /// TCPMIG_DEADLINE=SECS: the longest any freeze lasts (default 60).
    pub deadline: Duration,
    /// TCPMIG_REPORT=FILE: one JSON line per action is appended to FILE. In the file too, since
    /// podman passes CRIU no environment at all.
    pub report: Option<PathBuf>,
}

impl Config {
    /// The process's environment over the file it names (or [`DEFAULT_CONFIG`] if it exists).
    pub fn from_env() -> Result<Self, CriuError> {
        Self::from_env_and(None)
    }

    /// The process's environment over `settings`, or over the file it names when `settings` is
    /// None (the script `tcpmig criu-hook --install --settings` writes gives its file here).
    pub fn from_env_and(settings: Option<&Path>) -> Result<Self, CriuError> {
        let named = match settings {
            Some(path) => Some(path.display().to_string()),
            None => std::env::var(CONFIG_ENV).ok(),
        };
        let path = named.as_deref().unwrap_or(DEFAULT_CONFIG);
        let file = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(_) if named.is_none() && !Path::new(path).exists() => None,
            Err(source) => {
                return Err(CriuError::Io {
                    step: "reading the configuration",
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(file.as_deref(), std::env::vars())
    }

    /// `file` lines are KEY=VALUE (# comments); `env` wins over them.
    pub fn parse(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, CriuError> {
        let mut values = HashMap::new();
        for line in file.unwrap_or_default().lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue {
                    line: line.to_owned(),
                })?;
            let key = key.trim();
            if !KEYS.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    key: key.to_owned(),
                }
                .into());
            }
            values.insert(key.to_owned(), value.trim().to_owned());
        }
        values.extend(
            env.into_iter()
                .filter(|(key, _)| KEYS.contains(&key.as_str())),
        );
        let get = |key: &str| values.get(key).filter(|v| !v.is_empty());
        Ok(Self {
            dev: get("TCPMIG_DEV").map_or(DEFAULT_DEV, |v| v).to_owned(),
            services: get("TCPMIG_SERVICES").map_or(Ok(Vec::new()), |v| services(v))?,
            address: get("TCPMIG_ADDRESS").map(|v| address(v)).transpose()?,
            deadline: get("TCPMIG_DEADLINE")
                .map_or(Ok(DEFAULT_DEADLINE), |v| seconds("TCPMIG_DEADLINE", v))?,
            report: get("TCPMIG_REPORT").map(PathBuf::from),
        })
    }
}

fn services(value: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    value
        .split(',')
        .map(|service| {
            service
                .trim()
                .parse()
                .map_err(|source| ConfigError::Service {
                    service: service.to_owned(),
                    source,
                })
        })
        .collect()
}

fn address(value: &str) -> Result<(IpAddr, u8), ConfigError> {
    let value_owned = || value.to_owned();
    let (addr, prefix) = value
        .split_once('/')
        .ok_or_else(|| ConfigError::AddressForm {
            value: value_owned(),
        })?;
    let addr = addr
        .trim()
        .parse()
        .map_err(|source| ConfigError::AddressIp {
            value: value_owned(),
            source,
        })?;
    let prefix = prefix
        .trim()
        .parse()
        .map_err(|source| ConfigError::AddressPrefix {
            value: value_owned(),
            source,
        })?;
    Ok((addr, prefix))
}

/// A duration in seconds as the configuration gives it.
fn seconds(key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let error = |source| ConfigError::Seconds {
        key,
        value: value.to_owned(),
        source,
    };
    let seconds: f64 = value.trim().parse().map_err(|e| error(Some(e)))?;
    // try_: a value past Duration's range (1e30) is refused here, not a panic in the hook.
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(error(None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_wins_over_the_file() {
        let file = "# tcpmig\nTCPMIG_DEV = veth1\nTCPMIG_DEADLINE=5\nTCPMIG_REPORT=/run/a.jsonl\n";
        let config = Config::parse(
            Some(file),
            env(&[
                ("TCPMIG_DEADLINE", "2.5"),
                ("TCPMIG_ADDRESS", "fd00::1/64"),
                ("TCPMIG_SERVICES", "10.0.0.1:80, [fd00::1]:443"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.dev, "veth1");
        assert_eq!(config.deadline, Duration::from_millis(2500));
        assert_eq!(config.address, Some(("fd00::1".parse().unwrap(), 64)));
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.report, Some("/run/a.jsonl".into()));
        let moved = Config::parse(Some(file), env(&[("TCPMIG_REPORT", "/run/b.jsonl")]));
        assert_eq!(moved.unwrap().report, Some("/run/b.jsonl".into()));
    }

    #[test]
    fn defaults_and_errors() {
        let config = Config::parse(None, env(&[])).unwrap();
        assert_eq!(
            (config.dev.as_str(), config.deadline),
            ("eth0", DEFAULT_DEADLINE)
        );
        assert!(config.services.is_empty() && config.address.is_none());
        assert_eq!(config.report, None);
        for bad in [
            ("TCPMIG_DEADLINE", "0"),
            ("TCPMIG_DEADLINE", "1e30"),
            ("TCPMIG_DEADLINE", "NaN"),
            ("TCPMIG_ADDRESS", "10.0.0.1"),
            ("TCPMIG_SERVICES", "10.0.0.1"),
        ] {
            assert!(Config::parse(None, env(&[bad])).is_err(), "{bad:?}");
        }
        assert!(Config::parse(Some("TCPMIG_DEVICE=eth0"), env(&[])).is_err());
    }

    #[test]
    fn errors_name_the_key_and_keep_their_cause() {
        use std::error::Error as _;
        let error = |pair| Config::parse(None, env(&[pair])).unwrap_err();
        let not_a_number = error(("TCPMIG_DEADLINE", "soon"));
        assert!(
            not_a_number
                .to_string()
                .contains("TCPMIG_DEADLINE=\"soon\": give a positive number of seconds"),
            "{not_a_number}"
        );
        let CriuError::Config(config) = not_a_number else {
            panic!("a configuration error");
        };
        assert!(config.source().is_some(), "the parse error is kept");
        let CriuError::Config(negative) = error(("TCPMIG_DEADLINE", "-1")) else {
            panic!("a configuration error");
        };
        assert!(negative.source().is_none());
        let address = error(("TCPMIG_ADDRESS", "fd00::1/x"));
        assert!(
            address.to_string().contains("give ADDR/PREFIX"),
            "{address}"
        );
    }
}
