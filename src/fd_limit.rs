//! The process's file-descriptor limit against the connections idemd is
//! configured to hold. systemd's default soft limit (1,024) is below the
//! default `--max-connections` (4,096): at start-up the soft limit is raised
//! toward the hard limit, and a configuration the hard limit cannot honour
//! is refused with a message that says what to change, instead of failing
//! accepts with EMFILE under load.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors idemd needs besides its connections: the standard streams,
/// the listeners, the runtime's epoll and wakers, SQLite's files, the
/// tokens and certificate files while they are read, and some slack.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// What start-up did about the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimit {
    /// The soft limit already covered what is needed.
    Enough { soft: u64 },
    /// The soft limit was raised.
    Raised { from: u64, to: u64 },
}

/// Makes sure `needed` descriptors can be open at once, raising the soft
/// limit (to the hard limit) when it is lower.
pub fn ensure(needed: u64) -> Result<FdLimit, String> {
    let limit = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if soft >= needed {
        return Ok(FdLimit::Enough { soft });
    }
    if hard < needed {
        return Err(format!(
            "the file-descriptor limit (soft {soft}, hard {hard}) is below the {needed} descriptors \
             --max-connections, --metrics-max-connections and --db-max-connections need \
             (plus {RESERVED_DESCRIPTORS} reserved): raise LimitNOFILE / `ulimit -n`, or lower --max-connections"
        ));
    }
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })
        .map_err(|error| format!("cannot raise the file-descriptor soft limit from {soft} to {hard}: {error}"))?;
    Ok(FdLimit::Raised { from: soft, to: hard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_limit_already_allows_needs_no_change() {
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert_eq!(ensure(1), Ok(FdLimit::Enough { soft }));
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        if hard < u64::MAX {
            let error = ensure(hard + 1).expect_err("beyond the hard limit");
            assert!(error.contains("--max-connections") && error.contains("ulimit"), "{error}");
        }
    }
}
