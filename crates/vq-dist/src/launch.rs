//! Where a process is in a distributed launch: the environment that `torchrun` sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of `SLURM_JOB_NODELIST`).

use crate::error::{DistError, Result};

/// Default rendezvous port (torch's `TCPStoreOptions::kDefaultPort`).
pub const DEFAULT_PORT: u16 = 29500;

/// Which launcher set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `torchrun` (or anything that sets `RANK` / `WORLD_SIZE`, like `vq-train train --nproc`).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
}

impl Launcher {
    /// The variables it was read from, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Torchrun => "RANK/WORLD_SIZE (torchrun)",
            Self::Slurm => "SLURM_PROCID/SLURM_NTASKS (srun)",
        }
    }
}

/// This process's place in the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Global rank, `0 ≤ rank < world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank on this machine (the CUDA device index with `--device cuda`).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// Who launched us.
    pub launcher: Launcher,
    /// The launcher's agent hosts the rendezvous store (torchrun sets
    /// `TORCHELASTIC_USE_AGENT_STORE=True`); rank 0 then connects to it like the others.
    pub agent_store: bool,
    /// Launch attempt (torchrun's `TORCHELASTIC_RESTART_COUNT`, else 0).
    pub attempt: usize,
}

impl Launch {
    /// Reads the process environment; `None` when no launcher set it (a plain single process).
    ///
    /// # Errors
    /// [`DistError::Env`] naming the variable with a missing or bad value.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), with the variables from `get`.
    ///
    /// Rules: `RANK` and `WORLD_SIZE` (torchrun, with `TORCHELASTIC_USE_AGENT_STORE` and
    /// `TORCHELASTIC_RESTART_COUNT` when set) win; `LOCAL_RANK` defaults to 0, `MASTER_ADDR`
    /// and `MASTER_PORT` must be set when `WORLD_SIZE` > 1 (torchrun always sets them). Else
    /// `SLURM_PROCID` and `SLURM_NTASKS` with more than one task: `SLURM_LOCALID` (default 0),
    /// `MASTER_ADDR` or the first host of `SLURM_JOB_NODELIST` (`SLURM_NODELIST`),
    /// `MASTER_PORT` or `10000 + SLURM_JOB_ID mod 20000` (so that jobs sharing a node differ),
    /// else 29500. A Slurm allocation of one task is a plain single process.
    ///
    /// ```
    /// use vq_dist::{Launch, Launcher};
    /// let env = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"),
    ///            ("SLURM_JOB_NODELIST", "gpu[07-08]"), ("SLURM_JOB_ID", "123456")];
    /// let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    /// let l = Launch::from_vars(get).unwrap().unwrap();
    /// assert_eq!((l.rank, l.world, l.local_rank), (3, 8, 1));
    /// assert_eq!((l.master_addr.as_str(), l.master_port), ("gpu07", 13456));
    /// assert_eq!(l.launcher, Launcher::Slurm);
    /// ```
    ///
    /// # Errors
    /// [`DistError::Env`] naming the variable with a missing or bad value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |var: &'static str| -> Result<Option<usize>> {
            get(var)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| DistError::Env {
                        var,
                        value: v.clone(),
                        why: "not a non-negative integer".into(),
                    })
                })
                .transpose()
        };
        let port = |var: &'static str| -> Result<Option<u16>> {
            get(var)
                .map(|v| match v.trim().parse::<u16>() {
                    Ok(p) if p > 0 => Ok(p),
                    _ => Err(DistError::Env {
                        var,
                        value: v.clone(),
                        why: "not a TCP port (1..=65535)".into(),
                    }),
                })
                .transpose()
        };
        let (rank, world, launcher) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(w)) => (r, w, Launcher::Torchrun),
            (Some(_), None) => return Err(missing("WORLD_SIZE", "RANK is set")),
            (None, Some(_)) => return Err(missing("RANK", "WORLD_SIZE is set")),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(w)) if w > 1 => (r, w, Launcher::Slurm),
                _ => return Ok(None),
            },
        };
        if world == 0 {
            return Err(DistError::Env {
                var: world_var(launcher),
                value: "0".into(),
                why: "the world needs at least one process".into(),
            });
        }
        if rank >= world {
            return Err(DistError::Env {
                var: rank_var(launcher),
                value: rank.to_string(),
                why: format!("rank outside the world of {world} processes"),
            });
        }
        let (local_rank, master_addr, master_port) = match launcher {
            Launcher::Torchrun => {
                let addr = get("MASTER_ADDR");
                let p = port("MASTER_PORT")?;
                if world > 1 && addr.is_none() {
                    return Err(missing("MASTER_ADDR", "WORLD_SIZE > 1"));
                }
                if world > 1 && p.is_none() {
                    return Err(missing("MASTER_PORT", "WORLD_SIZE > 1"));
                }
                (
                    num("LOCAL_RANK")?.unwrap_or(0),
                    addr.unwrap_or_else(|| "127.0.0.1".into()),
                    p.unwrap_or(DEFAULT_PORT),
                )
            }
            Launcher::Slurm => {
                let addr = match get("MASTER_ADDR") {
                    Some(a) => a,
                    None => {
                        let (var, list) = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                            .into_iter()
                            .find_map(|v| get(v).map(|l| (v, l)))
                            .ok_or_else(|| missing("SLURM_JOB_NODELIST", "MASTER_ADDR is unset"))?;
                        first_host(&list).ok_or_else(|| DistError::Env {
                            var,
                            value: list.clone(),
                            why: "not a Slurm host list".into(),
                        })?
                    }
                };
                let p = match port("MASTER_PORT")? {
                    Some(p) => p,
                    None => match num("SLURM_JOB_ID")? {
                        Some(id) => (10_000 + id % 20_000) as u16,
                        None => DEFAULT_PORT,
                    },
                };
                (num("SLURM_LOCALID")?.unwrap_or(0), addr, p)
            }
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1"));
        let attempt = num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            launcher,
            agent_store,
            attempt,
        }))
    }
}

fn missing(var: &'static str, because: &str) -> DistError {
    DistError::Env {
        var,
        value: String::new(),
        why: format!("must be set when {because}"),
    }
}

fn rank_var(l: Launcher) -> &'static str {
    match l {
        Launcher::Torchrun => "RANK",
        Launcher::Slurm => "SLURM_PROCID",
    }
}

fn world_var(l: Launcher) -> &'static str {
    match l {
        Launcher::Torchrun => "WORLD_SIZE",
        Launcher::Slurm => "SLURM_NTASKS",
    }
}

/// A TCP port that is free on 127.0.0.1 now (the kernel's pick for a bind to port 0), for a
/// single-machine rendezvous. Another process may take it before it is used; rank 0 then fails
/// with [`DistError::PortInUse`].
///
/// # Errors
/// The bind failing.
pub fn free_local_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The first host of a Slurm host list, as `scontrol show hostnames` would print it first:
/// `gpu[07-09,12],cpu3` → `gpu07`, `rack[1-2]-n[3-4]` → `rack1-n3`, `a,b` → `a`. `None` for an
/// empty or malformed list.
///
/// ```
/// assert_eq!(vq_dist::launch::first_host("node[001-004,010],gpu5").as_deref(), Some("node001"));
/// assert_eq!(vq_dist::launch::first_host("localhost").as_deref(), Some("localhost"));
/// assert_eq!(vq_dist::launch::first_host("n[").as_deref(), None);
/// ```
pub fn first_host(list: &str) -> Option<String> {
    // The first item: up to the first comma outside brackets.
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let item = list[..end].trim();
    let mut host = String::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = rest[open..].find(']')? + open;
        let first = rest[open + 1..close].split(',').next()?.trim();
        let start = first.split('-').next()?.trim();
        if start.is_empty() || !start.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        host.push_str(start);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return None;
    }
    host.push_str(rest);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        Launch::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn torchrun_environment() {
        let l = launch(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29501"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 5,
                world: 8,
                local_rank: 1,
                master_addr: "10.0.0.2".into(),
                master_port: 29501,
                launcher: Launcher::Torchrun,
                agent_store: false,
                attempt: 0,
            }
        );
        let l = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert!(l.agent_store);
        assert_eq!(l.attempt, 2);
        // torchrun wins over Slurm variables (torchrun inside an allocation).
        let l = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.launcher), (0, 1, Launcher::Torchrun));
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(
            launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
            None
        );
    }

    #[test]
    fn bad_environments_name_the_variable() {
        let err = |vars: &[(&str, &str)]| launch(vars).unwrap_err().to_string();
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("WORLD_SIZE"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR"));
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(e.contains("MASTER_PORT") && e.contains("70000"), "{e}");
        let e = err(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "n[1"),
        ]);
        assert!(e.contains("SLURM_JOB_NODELIST"), "{e}");
    }

    #[test]
    fn slurm_host_lists() {
        for (list, host) in [
            ("gpu[07-09,12],cpu3", Some("gpu07")),
            ("rack[1-2]-n[3-4]", Some("rack1-n3")),
            ("a,b", Some("a")),
            ("c[5]", Some("c5")),
            ("x[1-2],y[3-4]", Some("x1")),
            ("", None),
            ("n[a-b]", None),
            ("n]", None),
        ] {
            assert_eq!(first_host(list).as_deref(), host, "{list}");
        }
    }
}
