//! The two database engines behind one small interface: [`Conn`] runs SQL written once, with
//! `?1, ?2, …` placeholders, on SQLite (rusqlite) or PostgreSQL (the sync `postgres` client,
//! pooled by r2d2), and hands back rows of [`Value`]s. Engine differences that SQL text cannot
//! hide are named here ([`Engine::lock_row`], [`Engine::claim`]); nothing else in the store
//! looks at the engine. No schema here (migrations/), no payload or member logic.

use std::collections::HashMap;
use std::error::Error as StdError;

use postgres::types::{to_sql_checked, IsNull, ToSql as PgToSql, Type};
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::StoreError;

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// Appended to a `SELECT … WHERE id = ?` that a transaction goes on to change: on
    /// PostgreSQL it locks the row (another instance's transaction on the same payload waits);
    /// SQLite's `BEGIN IMMEDIATE` already holds the whole database.
    pub fn lock_row(self) -> &'static str {
        match self {
            Engine::Sqlite => "",
            Engine::Postgres => " FOR UPDATE",
        }
    }

    /// Appended to a `SELECT` of candidate `payloads` rows (aliased `p` when joined) that the
    /// transaction claims: on PostgreSQL rows another instance is claiming right now are
    /// skipped rather than waited for, so concurrent matches take different payloads.
    pub fn claim(self, alias: &str) -> String {
        match self {
            Engine::Sqlite => String::new(),
            Engine::Postgres => format!(" FOR UPDATE OF {alias} SKIP LOCKED"),
        }
    }
}

/// One SQL parameter or column value. Both engines' integer columns are 64-bit; timestamps
/// are fixed-width RFC 3339 text (they compare as strings on both).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}
impl From<&Option<String>> for Value {
    fn from(v: &Option<String>) -> Self {
        v.as_deref().map_or(Value::Null, Into::into)
    }
}

/// `vals![a, b, …]`: the parameters of one statement, each converted into a [`Value`].
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::server::store::db::Value::from($v)),*][..] };
}
pub(crate) use vals;

/// One result row; the getters take the column's value and say which column was not what the
/// schema promises.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn bad(&self, i: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!(
            "column {i}: expected {want}, found {:?}",
            self.0.get(i)
        ))
    }

    pub fn text(&mut self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.bad(i, "text"))
    }

    /// A text column, left in the row.
    pub fn peek_text(&self, i: usize) -> Result<&str, StoreError> {
        match self.0.get(i) {
            Some(Value::Text(s)) => Ok(s),
            _ => Err(self.bad(i, "text")),
        }
    }

    pub fn opt_text(&mut self, i: usize) -> Result<Option<String>, StoreError> {
        match self.0.get_mut(i) {
            Some(Value::Text(s)) => Ok(Some(std::mem::take(s))),
            Some(Value::Null) => Ok(None),
            _ => Err(self.bad(i, "text")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?.ok_or_else(|| self.bad(i, "integer"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.0.get(i) {
            Some(Value::Int(v)) => Ok(Some(*v)),
            Some(Value::Null) => Ok(None),
            _ => Err(self.bad(i, "integer")),
        }
    }

    pub fn opt_real(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.0.get(i) {
            Some(Value::Real(v)) => Ok(Some(*v)),
            Some(Value::Int(v)) => Ok(Some(*v as f64)),
            Some(Value::Null) => Ok(None),
            _ => Err(self.bad(i, "number")),
        }
    }

    /// A 0/1 integer column.
    pub fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.int(i)? != 0)
    }
}

/// A connection or an open transaction on either engine.
pub trait Conn {
    fn engine(&self) -> Engine;
    /// Runs one statement that returns rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError>;
    /// Runs one statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Exactly one row (a row the transaction knows exists).
    fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row for {sql}")))
    }
}

// ---- SQLite ----

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

/// A rusqlite connection (or a transaction, which derefs to one).
pub struct Sqlite<'a>(pub &'a rusqlite::Connection);

impl Sqlite<'_> {
    fn row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Real(v) => Value::Real(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => {
                    return Err(rusqlite::Error::InvalidColumnType(
                        i,
                        "blob".into(),
                        rusqlite::types::Type::Blob,
                    ))
                }
            });
        }
        Ok(Row(out))
    }
}

impl Conn for Sqlite<'_> {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| Self::row(r, n))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }
}

// ---- PostgreSQL ----

impl PgToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("integer parameter for a {ty} column").into()),
            },
            Value::Real(v) => match *ty {
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// `?N` placeholders as PostgreSQL's `$N` (string literals left alone).
pub fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_str = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '?' if !in_str && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

fn pg_row(r: &postgres::Row) -> Result<Row, StoreError> {
    let mut out = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Real(v.into())),
            _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// A pooled PostgreSQL connection with its prepared statements (keyed by the store's SQL
/// text): each statement is parsed once per connection, not once per call.
pub struct PgConn {
    pub client: postgres::Client,
    pub statements: HashMap<String, postgres::Statement>,
    /// Set when a statement failed in a way that ends the session (the server terminated
    /// it, or the socket broke). The client notices the closed socket only a moment later,
    /// so without this a dead connection could go back to the pool and fail a second caller.
    pub broken: bool,
}

impl PgConn {
    /// Runs `f` on this connection and remembers whether its error ended the session.
    pub fn run<T>(
        &mut self,
        f: impl FnOnce(
            &mut postgres::Client,
            &mut HashMap<String, postgres::Statement>,
        ) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let res = f(&mut self.client, &mut self.statements);
        if let Err(e) = &res {
            self.broken |= ends_session(e);
        }
        res
    }
}

/// Errors after which the connection is of no further use: no SQLSTATE at all (I/O, a closed
/// socket), class 08 (connection exception) or 57P01..57P03 (administrator shutdown, crash
/// shutdown, cannot connect now: `pg_terminate_backend` and server restarts).
pub fn ends_session(e: &StoreError) -> bool {
    match e {
        StoreError::Pg(e) => match e.code() {
            None => e.as_db_error().is_none(),
            Some(c) => {
                let c = c.code();
                c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03")
            }
        },
        _ => false,
    }
}

/// The client or a transaction of one [`PgConn`], with that connection's statement cache.
pub struct Pg<'a, C: postgres::GenericClient> {
    pub client: &'a mut C,
    pub statements: &'a mut HashMap<String, postgres::Statement>,
}

impl<C: postgres::GenericClient> Pg<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&pg_placeholders(sql))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn PgToSql + Sync)> {
    params.iter().map(|v| v as &(dyn PgToSql + Sync)).collect()
}

impl<C: postgres::GenericClient> Conn for Pg<'_, C> {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let stmt = self.statement(sql)?;
        self.client
            .query(&stmt, &pg_params(params))?
            .iter()
            .map(pg_row)
            .collect()
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let stmt = self.statement(sql)?;
        Ok(self.client.execute(&stmt, &pg_params(params))?)
    }
}

/// r2d2's view of the PostgreSQL connections: how to open one and how to tell it is dead.
pub struct PgManager {
    pub config: postgres::Config,
    /// The TLS connector (`[database] sslmode` verify-ca / verify-full); None: plaintext.
    pub tls: Option<postgres_openssl::MakeTlsConnector>,
}

impl std::fmt::Debug for PgManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgManager")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A failed connection attempt, displayed with the server's message (r2d2 keeps only the
/// text of the last one).
#[derive(Debug)]
pub struct ConnectError(pub postgres::Error);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&super::pg_detail(&self.0))
    }
}

impl StdError for ConnectError {}

impl r2d2::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = ConnectError;

    fn connect(&self) -> Result<PgConn, ConnectError> {
        Ok(PgConn {
            client: match &self.tls {
                Some(tls) => self.config.connect(tls.clone()),
                None => self.config.connect(postgres::NoTls),
            }
            .map_err(ConnectError)?,
            statements: HashMap::new(),
            broken: false,
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), ConnectError> {
        conn.client
            .simple_query("")
            .map(|_| ())
            .map_err(ConnectError)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

/// SQLSTATEs after which the whole transaction is simply run again: a serialization failure
/// or a deadlock between two instances (PostgreSQL picked this one to abort).
pub fn is_retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Pg(e) => e.code().is_some_and(|c| {
            *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                || *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_outside_string_literals_become_dollars() {
        assert_eq!(
            pg_placeholders("UPDATE t SET a = ?12, r = 'x ?1 ' || COALESCE(b, '?') WHERE id = ?1"),
            "UPDATE t SET a = $12, r = 'x ?1 ' || COALESCE(b, '?') WHERE id = $1"
        );
    }
}
