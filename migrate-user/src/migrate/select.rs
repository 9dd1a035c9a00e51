//! Which of a service's connections a rebalance moves: a count, a fraction, the clients of some
//! networks, or a list of 4-tuples. The choice is made on the connections a listing found, so
//! it is stable (sorted by 4-tuple) and never picks one that is not there.
use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use ipnet::IpNet;

use crate::tuple::{Tuple, canonical};

/// A rebalance's choice of connections (`--select`).
#[derive(Clone, Debug, PartialEq)]
pub enum Selector {
    /// This many (all if fewer).
    Count(usize),
    /// This share of them, rounded down, in (0, 1].
    Fraction(f64),
    /// Those whose client is in one of these networks.
    Clients(Vec<IpNet>),
    /// Exactly these, read from a file (see [`Selector::from_str`]).
    Tuples(Vec<Tuple>),
}

/// A selector that does not parse, with what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(
        "selector {0:?}: write count=N, fraction=F (0 < F <= 1), client=CIDR[,CIDR...] or \
         file=PATH (one \"LOCAL REMOTE\" 4-tuple per line)"
    )]
    Syntax(String),
    #[error("selector file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "selector file {path}, line {line}: {text:?} is not \"LOCAL_ADDR:PORT REMOTE_ADDR:PORT\""
    )]
    Line {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

impl FromStr for Selector {
    type Err = SelectError;

    /// `count=N`, `fraction=F`, `client=CIDR,...` or `file=PATH`, where the file holds one
    /// 4-tuple per line, `LOCAL REMOTE` (`#` starts a comment).
    fn from_str(text: &str) -> Result<Self, SelectError> {
        let syntax = || SelectError::Syntax(text.to_owned());
        let (kind, value) = text.split_once('=').ok_or_else(syntax)?;
        match kind {
            "count" => value.parse().map(Selector::Count).map_err(|_| syntax()),
            "fraction" => match value.parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 1.0 => Ok(Selector::Fraction(f)),
                _ => Err(syntax()),
            },
            "client" => value
                .split(',')
                .map(|net| net.trim().parse::<IpNet>().map_err(|_| syntax()))
                .collect::<Result<_, _>>()
                .map(Selector::Clients),
            "file" => read_tuples(PathBuf::from(value)).map(Selector::Tuples),
            _ => Err(syntax()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Count(n) => write!(f, "count={n}"),
            Selector::Fraction(share) => write!(f, "fraction={share}"),
            Selector::Clients(nets) => {
                let nets: Vec<String> = nets.iter().map(IpNet::to_string).collect();
                write!(f, "client={}", nets.join(","))
            }
            Selector::Tuples(tuples) => write!(f, "{} listed 4-tuples", tuples.len()),
        }
    }
}

impl Selector {
    /// The connections of `found` this selector picks, sorted by 4-tuple.
    pub fn select(&self, found: &[Tuple]) -> Vec<Tuple> {
        let mut sorted = found.to_vec();
        sorted.sort_unstable_by_key(|t| (t.local, t.remote));
        match self {
            Selector::Count(n) => sorted.truncate(*n),
            Selector::Fraction(share) => {
                let n = (sorted.len() as f64 * share).floor() as usize;
                sorted.truncate(n);
            }
            Selector::Clients(nets) => {
                sorted.retain(|t| nets.iter().any(|net| net.contains(&t.remote.ip())));
            }
            Selector::Tuples(listed) => sorted.retain(|t| listed.contains(t)),
        }
        sorted
    }
}

fn read_tuples(path: PathBuf) -> Result<Vec<Tuple>, SelectError> {
    let text = std::fs::read_to_string(&path).map_err(|source| SelectError::File {
        path: path.clone(),
        source,
    })?;
    let mut tuples = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let parse = |addr: &str| addr.parse::<SocketAddr>().ok().map(canonical);
        let mut addrs = line.split_whitespace().map(parse);
        match (addrs.next().flatten(), addrs.next().flatten(), addrs.next()) {
            (Some(local), Some(remote), None) => tuples.push(Tuple { local, remote }),
            _ => {
                return Err(SelectError::Line {
                    path,
                    line: k + 1,
                    text: line.to_owned(),
                });
            }
        }
    }
    Ok(tuples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuples() -> Vec<Tuple> {
        (0..10)
            .map(|k| Tuple {
                local: "10.0.0.1:80".parse().unwrap(),
                remote: SocketAddr::from(([10, 0, 1, 10 + k], 40000)),
            })
            .rev()
            .collect()
    }

    #[test]
    fn counts_and_fractions_take_the_first_in_order() {
        let found = tuples();
        let three = "count=3".parse::<Selector>().unwrap().select(&found);
        assert_eq!(three.len(), 3);
        assert_eq!(three[0].remote, "10.0.1.10:40000".parse().unwrap());
        assert_eq!(
            "count=50".parse::<Selector>().unwrap().select(&found).len(),
            10
        );
        let share = "fraction=0.35".parse::<Selector>().unwrap().select(&found);
        assert_eq!(share, three);
    }

    #[test]
    fn clients_by_network() {
        let found = tuples();
        let picked = "client=10.0.1.12/31, 10.0.1.19/32"
            .parse::<Selector>()
            .unwrap()
            .select(&found);
        let hosts: Vec<_> = picked.iter().map(|t| t.remote.ip().to_string()).collect();
        assert_eq!(hosts, ["10.0.1.12", "10.0.1.13", "10.0.1.19"]);
    }

    #[test]
    fn a_file_of_tuples() {
        let path = std::env::temp_dir().join(format!("tcpmig-select-{}", std::process::id()));
        std::fs::write(
            &path,
            "# moved\n10.0.0.1:80 10.0.1.11:40000\n\n10.0.0.1:80 9.9.9.9:1\n",
        )
        .unwrap();
        let selector: Selector = format!("file={}", path.display()).parse().unwrap();
        let picked = selector.select(&tuples());
        assert_eq!(picked.len(), 1);
        std::fs::write(&path, "10.0.0.1:80\n").unwrap();
        let error = format!("file={}", path.display())
            .parse::<Selector>()
            .unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_selectors_say_what_to_write() {
        for bad in [
            "count",
            "count=x",
            "fraction=0",
            "fraction=1.5",
            "client=10.0.0.0/33",
            "all",
        ] {
            let error = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(error.contains("count=N"), "{bad}: {error}");
        }
    }
}
