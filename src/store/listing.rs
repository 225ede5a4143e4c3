//! Admin.ListRecords' query, built once for both databases: only the
//! filters asked for appear in the SQL (so that the planner sees `state =
//! 3` and can walk the index of aborted records alone, and sees the cursor
//! as a bound on the index), and every value is bound.

use crate::domain::{State, Timestamp};
use crate::operator::ListQuery;

/// A value bound to the listing's statement, in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ListValue<'a> {
    Text(&'a str),
    Time(Timestamp),
    Int(i64),
}

/// How a database writes what differs between the two.
pub(crate) struct Dialect {
    /// `$` (Postgres) or `?` (SQLite), followed by the value's number.
    pub placeholder: char,
    /// The database's clock.
    pub now: &'static str,
    /// Keys starting with a bound prefix, `{}` standing for its placeholder.
    pub starts_with: &'static str,
    /// An empty response column of the database's type.
    pub no_response: &'static str,
}

/// The SQL and its values: one page, plus one row that says whether
/// another page follows.
pub(crate) fn list_statement<'a>(query: &'a ListQuery, dialect: &Dialect) -> (String, Vec<ListValue<'a>>) {
    let mut values = Vec::new();
    let mut bind = |value: ListValue<'a>| {
        values.push(value);
        format!("{}{}", dialect.placeholder, values.len())
    };
    let mut sql = format!(
        "SELECT namespace, key, state, attempt, fingerprint, downstream_key, created_at, updated_at, \
         lease_expires_at, completed_at, expires_at, {} AS response, response_code, content_type, \
         abort_reason, aborted_by, outcome_unknown FROM idemd_records WHERE namespace = {} AND expires_at > {}",
        dialect.no_response,
        bind(ListValue::Text(query.namespace.as_str())),
        dialect.now,
    );
    if let Some(state) = query.state {
        sql += &format!(" AND state = {}", state as i32);
    }
    if query.aborted_only() {
        sql += &format!(" AND state = {}", State::Aborted as i32);
    }
    if query.outcome_unknown_only {
        sql += " AND outcome_unknown";
    }
    if let Some(before) = query.updated_before {
        sql += &format!(" AND updated_at < {}", bind(ListValue::Time(before)));
    }
    if let Some(after) = query.updated_after {
        sql += &format!(" AND updated_at >= {}", bind(ListValue::Time(after)));
    }
    if !query.key_prefix.is_empty() {
        let prefix = bind(ListValue::Text(query.key_prefix.as_str()));
        sql += &format!(" AND {}", dialect.starts_with.replace("{}", &prefix));
    }
    if let Some(cursor) = &query.after {
        let at = bind(ListValue::Time(cursor.updated_at));
        let key = bind(ListValue::Text(cursor.key.as_str()));
        // The first bound lets the index scan start at the cursor.
        sql += &format!(" AND updated_at <= {at} AND (updated_at < {at} OR key > {key})");
    }
    sql += &format!(" ORDER BY updated_at DESC, key LIMIT {}", bind(ListValue::Int(i64::from(query.page_size) + 1)));
    (sql, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Namespace;
    use crate::operator::Cursor;

    const PG: Dialect =
        Dialect { placeholder: '$', now: "now()", starts_with: "starts_with(key, {})", no_response: "NULL::bytea" };

    fn query() -> ListQuery {
        ListQuery {
            namespace: Namespace::parse("payments".into()).unwrap_or_else(|e| panic!("{e}")),
            state: None,
            outcome_unknown_only: false,
            updated_before: None,
            updated_after: None,
            key_prefix: String::new(),
            page_size: 100,
            after: None,
        }
    }

    #[test]
    fn only_the_filters_asked_for_appear_and_every_value_is_bound() {
        let (sql, values) = list_statement(&query(), &PG);
        assert!(sql.contains("namespace = $1") && sql.ends_with("LIMIT $2"), "{sql}");
        assert!(!sql.contains("state =") && !sql.contains("outcome_unknown AND"), "{sql}");
        assert_eq!(values, [ListValue::Text("payments"), ListValue::Int(101)]);

        let at = Timestamp::from_timestamp_micros(1_700_000_000_000_000).unwrap_or_default();
        let paged = ListQuery {
            outcome_unknown_only: true,
            key_prefix: "ord'".into(),
            after: Some(Cursor { updated_at: at, key: "k".into() }),
            ..query()
        };
        let (sql, values) = list_statement(&paged, &PG);
        assert!(sql.contains("AND state = 3 AND outcome_unknown"), "{sql}");
        assert!(sql.contains("starts_with(key, $2)") && !sql.contains("ord'"), "{sql}");
        assert!(sql.contains("updated_at <= $3 AND (updated_at < $3 OR key > $4)"), "{sql}");
        assert_eq!(values.len(), 5);
    }
}
