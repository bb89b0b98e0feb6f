//! walcast: SQLite replication as a loadable extension.
//!
//! Module map (the unsafe code is all in `vfs.rs`):
//! - `frame`: the walcast frame format and its CRC-64 chain.
//! - `wal`: reading SQLite's -wal file.
//! - `log`: the replication log file.
//! - `capture`: keeping the log in step with the WAL; base images; generations.
//! - `capture_failure`: a primary's last capture failure, for every process.
//! - `claim`: which WAL commits walcast wrote (to recognize foreign writes).
//! - `primary`: per-database state, role, capture thread, VFS hook decisions.
//! - `receive`: the replica's checks on received frames and snapshot replies.
//! - `restore`: verify and point-in-time restore from the log.
//! - `conf`: the role and identity file beside the database.
//! - `wire`: the message format; `seal`: optional authenticated encryption of
//!   messages; `transport`: NNG sockets and endpoints.
//! - `sql`: the SQL functions; `status`: status files for other processes.
//! - `vfs`: the `walcast` VFS callbacks, the API pointer, the entry point glue.

pub mod apply;
pub mod capture;
pub mod capture_failure;
pub mod claim;
pub mod conf;
pub mod frame;
pub mod log;
pub mod logtail;
pub mod primary;
pub mod publish;
pub mod receive;
pub mod replica;
pub mod restore;
pub mod seal;
pub mod signal;
pub mod sql;
pub mod status;
#[cfg(test)]
mod testutil;
pub mod transport;
pub mod vfs;
pub mod wal;
pub mod walindex;
pub mod wire;

use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

type ApiLoadable = sqlite_loadable::prelude::sqlite3_api_routines;
type DbLoadable = sqlite_loadable::prelude::sqlite3;

/// Per-connection setup: SQL functions and the pragma guard. Runs for the
/// connection that loads walcast and, as an auto-extension, for every connection
/// opened afterwards.
fn init_connection(db: *mut DbLoadable) -> sqlite_loadable::Result<()> {
    sql::register_functions(db)?;
    vfs::install_pragma_guard(db as *mut libsqlite3_sys::sqlite3);
    Ok(())
}

unsafe extern "C" fn auto_init(db: *mut DbLoadable, err: *mut *mut c_char, api: *mut ApiLoadable) -> c_int {
    catch_unwind(AssertUnwindSafe(|| sqlite_loadable::entrypoints::register_entrypoint(db, err, api, init_connection) as c_int))
        .unwrap_or(libsqlite3_sys::SQLITE_ERROR)
}

/// The entry point SQLite finds for `libwalcast.so`. It registers the walcast VFS
/// as the default VFS, sets up this connection and every later one, and asks
/// SQLite to keep the library loaded after this connection closes
/// (SQLITE_OK_LOAD_PERMANENTLY), since the VFS must outlive it.
///
/// # Safety
/// Called by SQLite's extension loader with valid pointers.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_walcast_init(db: *mut DbLoadable, err: *mut *mut c_char, api: *mut ApiLoadable) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        vfs::set_api(api as *mut libsqlite3_sys::sqlite3_api_routines);
        sqlite_loadable::entrypoints::register_entrypoint_load_permanently(db, err, api, |db| {
            vfs::register_vfs().map_err(sqlite_loadable::Error::new_message)?;
            vfs::register_auto_extension(auto_init as *const () as usize);
            init_connection(db)
        }) as c_int
    }))
    .unwrap_or(libsqlite3_sys::SQLITE_ERROR)
}
