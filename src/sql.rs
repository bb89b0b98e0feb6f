//! The SQL functions: `walcast_frame_no()`, `walcast_status()`, `walcast_wait(frame_no, timeout_ms)`,
//! `walcast_verify(db)` and `walcast_restore(db, out [, frame_no])`.
//!
//! Each fails with a clear message on a connection whose database is not on the
//! walcast VFS: such a connection would also have taken `PRAGMA walcast_role`
//! silently, so its user must learn that walcast is not in the way.

use crate::primary::{self, DbState};
use crate::vfs;
use sqlite_loadable::prelude::*;
use sqlite_loadable::{api, define_scalar_function, Error, FunctionFlags, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Runs a function body, turning a panic into an SQL error.
fn guarded<F: FnOnce() -> std::result::Result<(), String>>(ctx: *mut sqlite3_context, name: &str, f: F) -> Result<()> {
    let r = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err("internal error (panic caught)".to_string()),
    };
    r.map_err(|e| {
        let _ = ctx;
        Error::new_message(format!("{name}: {e}"))
    })
}

fn connection_state(ctx: *mut sqlite3_context) -> std::result::Result<Arc<DbState>, String> {
    let db = api::context_db_handle(ctx);
    vfs::state_of_connection(db as *mut libsqlite3_sys::sqlite3)
}

fn text_arg(values: &[*mut sqlite3_value], i: usize, what: &str) -> std::result::Result<String, String> {
    let v = values.get(i).ok_or_else(|| format!("missing argument: {what}"))?;
    if api::value_is_null(v) {
        return Err(format!("{what} is NULL"));
    }
    api::value_text(v).map(|s| s.to_string()).map_err(|_| format!("{what} is not valid UTF-8"))
}

/// Resolves a database path argument; if this process has that database open as
/// a primary, brings its log up to date first.
fn database_arg(values: &[*mut sqlite3_value]) -> std::result::Result<PathBuf, String> {
    let arg = text_arg(values, 0, "database path")?;
    let p = Path::new(&arg);
    let canon = std::fs::canonicalize(p).map_err(|e| format!("database {arg}: {e}"))?;
    for candidate in
        [canon.to_string_lossy().to_string(), std::path::absolute(p).map(|a| a.to_string_lossy().to_string()).unwrap_or_default()]
    {
        if let Some(s) = primary::lookup(&candidate) {
            if s.is_capturing() {
                s.catch_up_now()?;
            }
        }
    }
    Ok(canon)
}

fn frame_no(ctx: *mut sqlite3_context, _v: &[*mut sqlite3_value]) -> Result<()> {
    guarded(ctx, "walcast_frame_no", || {
        let s = connection_state(ctx)?;
        let n = s.last_frame_no()?;
        api::result_int64(ctx, n as i64);
        Ok(())
    })
}

/// `walcast_wait(frame_no, timeout_ms)`: 1 once the replica has applied
/// `frame_no`, 0 at the timeout. Blocks only the calling connection's thread.
fn wait(ctx: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    guarded(ctx, "walcast_wait", || {
        let s = connection_state(ctx)?;
        let int = |i: usize, what: &str| -> std::result::Result<i64, String> {
            let v = values.get(i).ok_or_else(|| format!("missing argument: {what}"))?;
            match api::value_type(v) {
                api::ValueType::Integer => Ok(api::value_int64(v)),
                _ => Err(format!("{what} must be an integer")),
            }
        };
        let frame_no = int(0, "frame_no")?;
        let timeout_ms = int(1, "timeout_ms")?;
        if frame_no < 0 || timeout_ms < 0 {
            return Err("frame_no and timeout_ms must not be negative".into());
        }
        let r = s.replica_shared().ok_or_else(|| format!("{} is not a walcast replica (walcast_wait waits on replicas)", s.db_path))?;
        let ok = r.wait_for(frame_no as u64, std::time::Duration::from_millis(timeout_ms as u64));
        api::result_int(ctx, ok as i32);
        Ok(())
    })
}

fn status(ctx: *mut sqlite3_context, _v: &[*mut sqlite3_value]) -> Result<()> {
    guarded(ctx, "walcast_status", || {
        let s = connection_state(ctx)?;
        api::result_text(ctx, s.status_json()).map_err(|e| e.result_error_message())
    })
}

fn verify(ctx: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    guarded(ctx, "walcast_verify", || {
        connection_state(ctx)?;
        let db = database_arg(values)?;
        let summary = crate::restore::verify(&db)?;
        api::result_text(ctx, summary).map_err(|e| e.result_error_message())
    })
}

fn restore(ctx: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    guarded(ctx, "walcast_restore", || {
        connection_state(ctx)?;
        let db = database_arg(values)?;
        let out = text_arg(values, 1, "output path")?;
        let frame = match values.get(2) {
            None => None,
            Some(v) if api::value_is_null(v) => None,
            Some(v) => match api::value_type(v) {
                api::ValueType::Integer => Some(api::value_int64(v)),
                _ => return Err("frame_no must be an integer".into()),
            },
        };
        let summary = crate::restore::restore(&db, Path::new(&out), frame)?;
        api::result_text(ctx, summary).map_err(|e| e.result_error_message())
    })
}

/// Registers the functions on one connection.
pub fn register_functions(db: *mut sqlite3) -> Result<()> {
    let flags = FunctionFlags::UTF8;
    define_scalar_function(db, "walcast_frame_no", 0, frame_no, flags)?;
    define_scalar_function(db, "walcast_status", 0, status, flags)?;
    define_scalar_function(db, "walcast_wait", 2, wait, flags)?;
    define_scalar_function(db, "walcast_verify", 1, verify, flags)?;
    define_scalar_function(db, "walcast_restore", 2, restore, flags)?;
    define_scalar_function(db, "walcast_restore", 3, restore, flags)?;
    Ok(())
}
