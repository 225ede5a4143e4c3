//! Postgres URLs as libpq reads them, including what sqlx cannot: several
//! hosts (`postgres://u@a:5432,b:5432/db` or `?host=a,b&port=5432,5433`) and
//! `target_session_attrs`. Each host becomes a one-host URL sqlx can parse;
//! which of them idemd uses is [`super::pg_target`]'s job.

use std::fmt;

/// Which server of a multi-host URL idemd may use (libpq's names). idemd
/// writes, so the read-only choices of libpq are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// The first host that accepts a connection.
    Any,
    /// The first host whose sessions are not read-only (`transaction_read_only = off`).
    ReadWrite,
    /// The first host that is not in recovery (not a standby).
    Primary,
}

/// One host of the list, as written (`name`, `10.0.0.1`, `[::1]`, or a socket directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<String>,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// A Postgres URL split into the parts a multi-host list touches. Values
/// stay percent-encoded as written; only structure is interpreted.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    scheme: String,
    userinfo: Option<String>,
    /// Hosts from the authority, or from the `host` parameter when the authority has none.
    pub hosts: Vec<HostPort>,
    /// Hosts came from `?host=`: per-host URLs say `host=` (socket directories live there).
    hosts_in_query: bool,
    path: String,
    /// Query parameters other than `host`, `port` and `target_session_attrs`.
    params: Vec<(String, String)>,
    pub attrs: SessionAttrs,
    /// `target_session_attrs` was written (libpq's default is `any`).
    attrs_given: bool,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl PgUrl {
    pub fn parse(url: &str) -> Result<PgUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or("a Postgres URL starts with postgres://")?;
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(slash) => before_query.split_at(slash),
            None => (before_query, ""),
        };
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_string()), hosts),
            None => (None, authority),
        };
        if path.contains('@') {
            return Err("an '@' after the host list: percent-encode special characters of the user \
                        and password (%2F for /, %3F for ?, %40 for @)"
                .into());
        }
        let mut hosts = Vec::new();
        if !host_list.is_empty() {
            for entry in host_list.split(',') {
                hosts.push(split_host_port(entry)?);
            }
        }

        let mut params = Vec::new();
        let mut query_hosts = None;
        let mut query_ports = None;
        let mut attrs = SessionAttrs::Any;
        let mut attrs_given = false;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "host" => query_hosts = Some(value.to_string()),
                "port" => query_ports = Some(value.to_string()),
                "target_session_attrs" => {
                    attrs = session_attrs(value)?;
                    attrs_given = true;
                }
                _ => params.push((name.to_string(), value.to_string())),
            }
        }

        let hosts_in_query = hosts.is_empty() && query_hosts.is_some();
        if hosts_in_query {
            let names = query_hosts.unwrap_or_default();
            hosts = names.split(',').map(|host| HostPort { host: host.to_string(), port: None }).collect();
        } else if query_hosts.is_some() {
            return Err("hosts are given both before the path and in ?host=; use one".into());
        }
        if let Some(ports) = query_ports {
            let ports: Vec<&str> = ports.split(',').collect();
            if hosts.is_empty() {
                hosts.push(HostPort { host: "localhost".into(), port: None });
            }
            if ports.len() != 1 && ports.len() != hosts.len() {
                return Err(format!("{} ports for {} hosts: give one port, or one per host", ports.len(), hosts.len()));
            }
            for (i, host) in hosts.iter_mut().enumerate() {
                if host.port.is_some() {
                    return Err("a port is given both after a host and in ?port=; use one".into());
                }
                host.port = Some(ports[if ports.len() == 1 { 0 } else { i }].to_string());
            }
        }
        if hosts.iter().any(|h| h.host.is_empty()) {
            return Err("an empty host in the host list".into());
        }
        if let Some(port) = hosts.iter().filter_map(|h| h.port.as_deref()).find(|p| p.parse::<u16>().is_err()) {
            return Err(format!("port {port:?} is not a port number"));
        }
        if hosts.len() > 1 && !attrs_given {
            return Err("several hosts need target_session_attrs: read-write for a primary and its standbys \
                        (idemd writes), or any for several poolers in front of one primary"
                .into());
        }
        if hosts_in_query && userinfo.is_some() {
            return Err("with ?host=, give the user and password as ?user= and &password=".into());
        }
        Ok(PgUrl {
            scheme: scheme.to_string(),
            userinfo,
            hosts,
            hosts_in_query,
            path: path.to_string(),
            params,
            attrs,
            attrs_given,
        })
    }

    /// More than one host, or a session requirement: idemd must choose and re-choose.
    pub fn needs_locating(&self) -> bool {
        self.hosts.len() > 1 || self.attrs != SessionAttrs::Any
    }

    /// One URL per host, in order, each with every other setting of the original.
    pub fn per_host_urls(&self) -> Vec<String> {
        if self.hosts.is_empty() {
            return vec![self.assemble(None, true)];
        }
        self.hosts.iter().map(|host| self.assemble(Some(host), true)).collect()
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        if let Some(userinfo) = &copy.userinfo
            && let Some((user, _)) = userinfo.split_once(':')
        {
            copy.userinfo = Some(format!("{user}:***"));
        }
        for (name, value) in &mut copy.params {
            if name == "password" {
                *value = "***".into();
            }
        }
        let mut text = format!("{}://", copy.scheme);
        if let Some(userinfo) = &copy.userinfo {
            text.push_str(userinfo);
            text.push('@');
        }
        let hosts: Vec<String> = copy.hosts.iter().map(ToString::to_string).collect();
        text.push_str(&hosts.join(","));
        text.push_str(&copy.path);
        let mut params: Vec<String> = copy.params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if copy.attrs_given {
            params.push(format!("target_session_attrs={}", attrs_value(copy.attrs)));
        }
        if !params.is_empty() {
            text.push('?');
            text.push_str(&params.join("&"));
        }
        text
    }

    fn assemble(&self, host: Option<&HostPort>, with_params: bool) -> String {
        let mut text = format!("{}://", self.scheme);
        if let Some(userinfo) = &self.userinfo {
            text.push_str(userinfo);
            text.push('@');
        }
        let mut params: Vec<(String, String)> = Vec::new();
        match host {
            Some(host) if self.hosts_in_query => {
                params.push(("host".into(), host.host.clone()));
                if let Some(port) = &host.port {
                    params.push(("port".into(), port.clone()));
                }
            }
            Some(host) => text.push_str(&host.to_string()),
            None => {}
        }
        text.push_str(&self.path);
        if with_params {
            params.extend(self.params.iter().cloned());
        }
        let params: Vec<String> = params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if !params.is_empty() {
            text.push('?');
            text.push_str(&params.join("&"));
        }
        text
    }
}

fn attrs_value(attrs: SessionAttrs) -> &'static str {
    match attrs {
        SessionAttrs::Any => "any",
        SessionAttrs::ReadWrite => "read-write",
        SessionAttrs::Primary => "primary",
    }
}

fn session_attrs(value: &str) -> Result<SessionAttrs, String> {
    match value {
        "any" => Ok(SessionAttrs::Any),
        "read-write" => Ok(SessionAttrs::ReadWrite),
        "primary" => Ok(SessionAttrs::Primary),
        "read-only" | "standby" | "prefer-standby" => {
            Err(format!("target_session_attrs={value}: idemd writes; use read-write, primary or any"))
        }
        other => Err(format!("unknown target_session_attrs={other}: use read-write, primary or any")),
    }
}

fn split_host_port(entry: &str) -> Result<HostPort, String> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(|| format!("unclosed [ in host {entry}"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| format!("bad port in host {entry}"))?.to_string()),
        };
        return Ok(HostPort { host: format!("[{address}]"), port });
    }
    Ok(match entry.rsplit_once(':') {
        Some((host, port)) => HostPort { host: host.to_string(), port: Some(port.to_string()) },
        None => HostPort { host: entry.to_string(), port: None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_stays_one_url() {
        let url = PgUrl::parse("postgres://idemd:pw@db:5432/idemd?sslmode=require").expect("parse");
        assert!(!url.needs_locating());
        assert_eq!(url.per_host_urls(), vec!["postgres://idemd:pw@db:5432/idemd?sslmode=require"]);
    }

    #[test]
    fn hosts_in_the_authority_become_one_url_each() {
        let url = PgUrl::parse("postgresql://u:pw@a:5432,b,[::1]:6000/db?target_session_attrs=read-write&x=1")
            .expect("parse");
        assert_eq!(url.attrs, SessionAttrs::ReadWrite);
        assert!(url.needs_locating());
        assert_eq!(
            url.per_host_urls(),
            vec![
                "postgresql://u:pw@a:5432/db?x=1",
                "postgresql://u:pw@b/db?x=1",
                "postgresql://u:pw@[::1]:6000/db?x=1"
            ]
        );
    }

    #[test]
    fn hosts_and_ports_in_the_query_pair_up() {
        let url = PgUrl::parse("postgres:///db?host=a,b&port=1,2&user=u&target_session_attrs=primary").expect("parse");
        assert_eq!(url.attrs, SessionAttrs::Primary);
        assert_eq!(
            url.per_host_urls(),
            vec!["postgres:///db?host=a&port=1&user=u", "postgres:///db?host=b&port=2&user=u"]
        );
        let one_port = PgUrl::parse("postgres://u@a,b/db?port=7&target_session_attrs=any").expect("parse");
        assert_eq!(one_port.per_host_urls(), vec!["postgres://u@a:7/db", "postgres://u@b:7/db"]);
    }

    #[test]
    fn what_idemd_cannot_use_is_refused() {
        for bad in [
            "postgres://a,b/db?target_session_attrs=read-only",
            "postgres://a,b/db?target_session_attrs=standby",
            "postgres://a,b/db?target_session_attrs=whatever",
            "postgres://a,b,c/db?port=1,2&target_session_attrs=read-write",
            "postgres://a:1,b/db?port=2&target_session_attrs=read-write",
            "postgres://a,,b/db?target_session_attrs=read-write",
            "postgres://a/db?host=b",
            "db.example.com",
            // Several hosts and no word on which one takes writes.
            "postgres://a,b/db",
            // An unencoded / in the password would split it off as a path.
            "postgres://u:1234/5678@db/x",
            "postgres://a:54x2/db",
            "postgres://u:pw@/db?host=a,b&target_session_attrs=read-write",
        ] {
            assert!(PgUrl::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn passwords_never_reach_the_redacted_form() {
        let url =
            PgUrl::parse("postgres://u:s3cret@a,b/db?password=s3cret&target_session_attrs=read-write").expect("parse");
        let redacted = url.redacted();
        assert!(!redacted.contains("s3cret"), "{redacted}");
        assert_eq!(redacted, "postgres://u:***@a,b/db?password=***&target_session_attrs=read-write");
        assert!(!format!("{url:?}").contains("s3cret"));
    }
}
