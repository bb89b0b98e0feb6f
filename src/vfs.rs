//! The unsafe layer: the `walcast` VFS's `extern "C"` callbacks, the API pointer,
//! and small safe wrappers over SQLite handles that the safe modules use.
//!
//! Every callback runs its body inside `guard`, which catches panics (a panic that
//! unwinds into SQLite aborts the host process) and turns them into an SQLite
//! error code. Decisions are made by safe code in `primary.rs`; this file only
//! translates between SQLite's C structures and those calls.

use crate::primary::{self, DbState, PragmaOutcome};
use libsqlite3_sys as ffi;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, OnceLock};

pub const VFS_NAME: &str = "walcast";
static VFS_NAME_C: &CStr = c"walcast";

// ---------------------------------------------------------------------------
// The API pointer

static API: AtomicPtr<ffi::sqlite3_api_routines> = AtomicPtr::new(ptr::null_mut());

/// Stores the API routines the loader handed to the entry point.
pub fn set_api(p: *mut ffi::sqlite3_api_routines) {
    if !p.is_null() {
        API.store(p, Ordering::Release);
    }
}

fn api() -> &'static ffi::sqlite3_api_routines {
    let p = API.load(Ordering::Acquire);
    assert!(!p.is_null(), "walcast: SQLite API pointer not set");
    // SAFETY: the loader's routines table lives as long as the SQLite library.
    unsafe { &*p }
}

macro_rules! call {
    ($name:ident ( $($arg:expr),* )) => {
        (api().$name.expect(concat!("SQLite API lacks ", stringify!($name))))($($arg),*)
    };
}

/// Sends a message to SQLite's error log (sqlite3_log), where an application that
/// configured SQLITE_CONFIG_LOG sees it. Nothing when walcast is not loaded.
pub fn sqlite_log(msg: &str) {
    let p = API.load(Ordering::Acquire);
    if p.is_null() {
        return;
    }
    let Ok(c) = CString::new(msg.replace('\0', " ")) else { return };
    // SAFETY: the routines table is valid; "%s" consumes exactly one C string.
    unsafe {
        if let Some(log) = (*p).log {
            log(ffi::SQLITE_WARNING, c"walcast: %s".as_ptr(), c.as_ptr());
        }
    }
}

/// Runs a callback body, turning a panic into `on_panic`.
fn guard<T, F: FnOnce() -> T>(on_panic: T, f: F) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let _ = catch_unwind(|| crate::primary::report(&format!("internal error (panic caught at the SQLite boundary): {msg}")));
            on_panic
        }
    }
}

/// A copy of `s` in memory from sqlite3_malloc, for SQLite to free.
fn sqlite_string(s: &str) -> *mut c_char {
    let bytes = s.as_bytes();
    unsafe {
        let p = call!(malloc(bytes.len() as c_int + 1)) as *mut u8;
        if p.is_null() {
            return ptr::null_mut();
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
        p as *mut c_char
    }
}

// ---------------------------------------------------------------------------
// Registration

struct Globals {
    inner: *mut ffi::sqlite3_vfs,
    ours: *mut ffi::sqlite3_vfs,
}
// SAFETY: both VFS objects are immutable once registered and live forever.
unsafe impl Send for Globals {}
unsafe impl Sync for Globals {}

static GLOBALS: OnceLock<Globals> = OnceLock::new();

fn inner_vfs() -> *mut ffi::sqlite3_vfs {
    GLOBALS.get().expect("walcast VFS not registered").inner
}

pub fn our_vfs() -> *mut ffi::sqlite3_vfs {
    GLOBALS.get().map(|g| g.ours).unwrap_or(ptr::null_mut())
}

/// Registers the walcast VFS as the default VFS, wrapping the current default.
/// Idempotent: loading the extension again changes nothing.
pub fn register_vfs() -> Result<(), String> {
    if GLOBALS.get().is_some() {
        return Ok(());
    }
    unsafe {
        let existing = call!(vfs_find(VFS_NAME_C.as_ptr()));
        if !existing.is_null() {
            return Ok(());
        }
        let inner = call!(vfs_find(ptr::null()));
        if inner.is_null() {
            return Err("no default VFS to wrap".into());
        }
        let iv = &*inner;
        let ours = Box::new(ffi::sqlite3_vfs {
            iVersion: iv.iVersion.min(3),
            szOsFile: (std::mem::size_of::<WcFile>() as c_int) + iv.szOsFile,
            mxPathname: iv.mxPathname,
            pNext: ptr::null_mut(),
            zName: VFS_NAME_C.as_ptr(),
            pAppData: ptr::null_mut(),
            xOpen: Some(x_open),
            xDelete: Some(x_delete),
            xAccess: Some(x_access),
            xFullPathname: Some(x_full_pathname),
            xDlOpen: Some(x_dl_open),
            xDlError: Some(x_dl_error),
            xDlSym: Some(x_dl_sym),
            xDlClose: Some(x_dl_close),
            xRandomness: Some(x_randomness),
            xSleep: Some(x_sleep),
            xCurrentTime: Some(x_current_time),
            xGetLastError: Some(x_get_last_error),
            xCurrentTimeInt64: if iv.iVersion >= 2 { Some(x_current_time_int64) } else { None },
            xSetSystemCall: if iv.iVersion >= 3 { iv.xSetSystemCall } else { None },
            xGetSystemCall: if iv.iVersion >= 3 { iv.xGetSystemCall } else { None },
            xNextSystemCall: if iv.iVersion >= 3 { iv.xNextSystemCall } else { None },
        });
        let ours = Box::into_raw(ours);
        let rc = call!(vfs_register(ours, 1));
        if rc != ffi::SQLITE_OK {
            drop(Box::from_raw(ours));
            return Err(format!("sqlite3_vfs_register failed ({rc})"));
        }
        let _ = GLOBALS.set(Globals { inner, ours });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Files

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FileKind {
    MainDb,
    /// A temporary or in-memory-backed database: never replicated.
    TempDb,
    Wal,
    Other,
}

/// Our sqlite3_file. SQLite allocates `szOsFile` bytes: this struct, then the
/// wrapped VFS's file object.
#[repr(C)]
struct WcFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    /// The database this file belongs to (main db or its WAL), from Arc::into_raw.
    state: *const DbState,
    kind: FileKind,
    readonly: bool,
    /// The shm READ lock slots (3..7) this handle holds: a connection asking for
    /// the WAL write lock while it holds one is starting a write transaction.
    read_slots: u8,
}

impl WcFile {
    fn state(&self) -> Option<&DbState> {
        // SAFETY: `state` holds a strong count from Arc::into_raw until xClose.
        unsafe { self.state.as_ref() }
    }
    fn inner_methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: set by the wrapped xOpen, which succeeded.
        unsafe { &*(*self.inner).pMethods }
    }
}

const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(f_close),
        xRead: Some(f_read),
        xWrite: Some(f_write),
        xTruncate: Some(f_truncate),
        xSync: Some(f_sync),
        xFileSize: Some(f_file_size),
        xLock: Some(f_lock),
        xUnlock: Some(f_unlock),
        xCheckReservedLock: Some(f_check_reserved_lock),
        xFileControl: Some(f_file_control),
        xSectorSize: Some(f_sector_size),
        xDeviceCharacteristics: Some(f_device_characteristics),
        xShmMap: if version >= 2 { Some(f_shm_map) } else { None },
        xShmLock: if version >= 2 { Some(f_shm_lock) } else { None },
        xShmBarrier: if version >= 2 { Some(f_shm_barrier) } else { None },
        xShmUnmap: if version >= 2 { Some(f_shm_unmap) } else { None },
        xFetch: if version >= 3 { Some(f_fetch) } else { None },
        xUnfetch: if version >= 3 { Some(f_unfetch) } else { None },
    }
}

static METHODS_V1: ffi::sqlite3_io_methods = methods(1);
static METHODS_V2: ffi::sqlite3_io_methods = methods(2);
static METHODS_V3: ffi::sqlite3_io_methods = methods(3);

unsafe fn wc<'a>(f: *mut ffi::sqlite3_file) -> &'a WcFile {
    &*(f as *const WcFile)
}

fn cstr_opt<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        None
    } else {
        // SAFETY: SQLite passes NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_str().ok()
    }
}

/// A URI parameter of a filename SQLite passed to xOpen.
fn uri_param(name: *const c_char, key: &CStr) -> Option<String> {
    if name.is_null() {
        return None;
    }
    unsafe { cstr_opt(call!(uri_parameter(name, key.as_ptr()))).map(|s| s.to_string()) }
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        let w = file as *mut WcFile;
        let inner = (file as *mut u8).add(std::mem::size_of::<WcFile>()) as *mut ffi::sqlite3_file;
        ptr::write(
            w,
            WcFile {
                base: ffi::sqlite3_file { pMethods: ptr::null() },
                inner,
                state: ptr::null(),
                kind: FileKind::Other,
                readonly: flags & ffi::SQLITE_OPEN_READONLY != 0,
                read_slots: 0,
            },
        );
        let ivfs = inner_vfs();
        let rc = ((*ivfs).xOpen.unwrap())(ivfs, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if (*inner).pMethods.is_null() {
            return rc;
        }
        // From here on the wrapped file is open: a panic must close it again and
        // leave pMethods NULL, so that SQLite does not use a half-made file.
        match catch_unwind(AssertUnwindSafe(|| finish_open(w, inner, name, flags))) {
            Ok(rc) => rc,
            Err(_) => {
                ((*(*inner).pMethods).xClose.unwrap())(inner);
                (*w).base.pMethods = ptr::null();
                primary::report("internal error while opening a file; the open failed");
                ffi::SQLITE_CANTOPEN
            }
        }
    })
}

unsafe fn finish_open(w: *mut WcFile, inner: *mut ffi::sqlite3_file, name: *const c_char, flags: c_int) -> c_int {
    {
        let path = cstr_opt(name);
        let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
            if path.is_none() || flags & ffi::SQLITE_OPEN_DELETEONCLOSE != 0 || flags & ffi::SQLITE_OPEN_MEMORY != 0 {
                FileKind::TempDb
            } else {
                FileKind::MainDb
            }
        } else if flags & ffi::SQLITE_OPEN_TEMP_DB != 0 {
            FileKind::TempDb
        } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
            FileKind::Wal
        } else {
            FileKind::Other
        };
        (*w).kind = kind;
        (*w).base.pMethods = match (*(*inner).pMethods).iVersion {
            1 => &METHODS_V1,
            2 => &METHODS_V2,
            _ => &METHODS_V3,
        };
        let state: Option<Arc<DbState>> = match (kind, path) {
            (FileKind::MainDb, Some(p)) => {
                let uri_role = uri_param(name, c"walcast_role");
                let readonly = flags & ffi::SQLITE_OPEN_READONLY != 0;
                let uri_endpoint = uri_param(name, c"walcast_endpoint");
                match primary::on_main_db_open(p, uri_role.as_deref(), uri_endpoint, readonly) {
                    Ok(s) => Some(s),
                    Err(msg) => {
                        primary::report(&msg);
                        ((*(*inner).pMethods).xClose.unwrap())(inner);
                        (*w).base.pMethods = ptr::null();
                        return ffi::SQLITE_CANTOPEN;
                    }
                }
            }
            (FileKind::Wal, Some(p)) => p.strip_suffix("-wal").and_then(primary::lookup),
            _ => None,
        };
        if let Some(s) = state {
            (*w).state = Arc::into_raw(s);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_delete(_vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_DELETE, || {
        let ivfs = inner_vfs();
        let delete = || ((*ivfs).xDelete.unwrap())(ivfs, name, sync_dir);
        match cstr_opt(name).and_then(|p| p.strip_suffix("-wal")).and_then(primary::lookup) {
            Some(state) => state.wal_delete(delete),
            None => delete(),
        }
    })
}

unsafe extern "C" fn x_access(_v: *mut ffi::sqlite3_vfs, name: *const c_char, flags: c_int, out: *mut c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_ACCESS, || {
        let i = inner_vfs();
        ((*i).xAccess.unwrap())(i, name, flags, out)
    })
}
unsafe extern "C" fn x_full_pathname(_v: *mut ffi::sqlite3_vfs, name: *const c_char, n: c_int, out: *mut c_char) -> c_int {
    guard(ffi::SQLITE_CANTOPEN, || {
        let i = inner_vfs();
        ((*i).xFullPathname.unwrap())(i, name, n, out)
    })
}
unsafe extern "C" fn x_dl_open(_v: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    guard(ptr::null_mut(), || {
        let i = inner_vfs();
        ((*i).xDlOpen.unwrap())(i, name)
    })
}
unsafe extern "C" fn x_dl_error(_v: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    guard((), || {
        let i = inner_vfs();
        ((*i).xDlError.unwrap())(i, n, out)
    })
}
unsafe extern "C" fn x_dl_sym(
    _v: *mut ffi::sqlite3_vfs,
    h: *mut c_void,
    sym: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    guard(None, || {
        let i = inner_vfs();
        ((*i).xDlSym.unwrap())(i, h, sym)
    })
}
unsafe extern "C" fn x_dl_close(_v: *mut ffi::sqlite3_vfs, h: *mut c_void) {
    guard((), || {
        let i = inner_vfs();
        ((*i).xDlClose.unwrap())(i, h)
    })
}
unsafe extern "C" fn x_randomness(_v: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    guard(0, || {
        let i = inner_vfs();
        ((*i).xRandomness.unwrap())(i, n, out)
    })
}
unsafe extern "C" fn x_sleep(_v: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    guard(0, || {
        let i = inner_vfs();
        ((*i).xSleep.unwrap())(i, us)
    })
}
unsafe extern "C" fn x_current_time(_v: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        let i = inner_vfs();
        ((*i).xCurrentTime.unwrap())(i, out)
    })
}
unsafe extern "C" fn x_get_last_error(_v: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    guard(0, || {
        let i = inner_vfs();
        ((*i).xGetLastError.unwrap())(i, n, out)
    })
}
unsafe extern "C" fn x_current_time_int64(_v: *mut ffi::sqlite3_vfs, out: *mut ffi::sqlite3_int64) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        let i = inner_vfs();
        ((*i).xCurrentTimeInt64.unwrap())(i, out)
    })
}

// -- io methods ---------------------------------------------------------------

unsafe extern "C" fn f_close(f: *mut ffi::sqlite3_file) -> c_int {
    guard(ffi::SQLITE_IOERR_CLOSE, || {
        let w = &mut *(f as *mut WcFile);
        let rc = (w.inner_methods().xClose.unwrap())(w.inner);
        if !w.state.is_null() {
            if w.kind == FileKind::MainDb {
                (*w.state).main_db_closed();
            }
            drop(Arc::from_raw(w.state));
            w.state = ptr::null();
        }
        rc
    })
}

unsafe extern "C" fn f_read(f: *mut ffi::sqlite3_file, buf: *mut c_void, amt: c_int, off: ffi::sqlite3_int64) -> c_int {
    guard(ffi::SQLITE_IOERR_READ, || {
        let w = wc(f);
        (w.inner_methods().xRead.unwrap())(w.inner, buf, amt, off)
    })
}

unsafe extern "C" fn f_write(f: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, off: ffi::sqlite3_int64) -> c_int {
    guard(ffi::SQLITE_IOERR_WRITE, || {
        let w = wc(f);
        let write = || (w.inner_methods().xWrite.unwrap())(w.inner, buf, amt, off);
        let Some(state) = w.state() else { return write() };
        let data = std::slice::from_raw_parts(buf as *const u8, amt.max(0) as usize);
        match w.kind {
            FileKind::Wal => state.wal_write(off as u64, data, || wal_index_header(state.wal_index_addr()), write),
            FileKind::MainDb => match state.before_db_write(off as u64, data) {
                Ok(()) => write(),
                Err(e) => {
                    primary::report(&e.message);
                    e.code
                }
            },
            _ => write(),
        }
    })
}

unsafe extern "C" fn f_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    guard(ffi::SQLITE_IOERR_TRUNCATE, || {
        let w = wc(f);
        let truncate = || (w.inner_methods().xTruncate.unwrap())(w.inner, size);
        match (w.kind, w.state()) {
            (FileKind::Wal, Some(state)) => state.wal_truncate(size.max(0) as u64, truncate),
            _ => truncate(),
        }
    })
}

unsafe extern "C" fn f_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_FSYNC, || {
        let w = wc(f);
        (w.inner_methods().xSync.unwrap())(w.inner, flags)
    })
}

unsafe extern "C" fn f_file_size(f: *mut ffi::sqlite3_file, out: *mut ffi::sqlite3_int64) -> c_int {
    guard(ffi::SQLITE_IOERR_FSTAT, || {
        let w = wc(f);
        (w.inner_methods().xFileSize.unwrap())(w.inner, out)
    })
}

unsafe extern "C" fn f_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_LOCK, || {
        let w = wc(f);
        let lock = || (w.inner_methods().xLock.unwrap())(w.inner, l);
        match (w.kind, w.state()) {
            (FileKind::MainDb, Some(state)) if l == ffi::SQLITE_LOCK_EXCLUSIVE => state.exclusive_db_lock(lock),
            _ => lock(),
        }
    })
}

unsafe extern "C" fn f_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_UNLOCK, || {
        let w = wc(f);
        (w.inner_methods().xUnlock.unwrap())(w.inner, l)
    })
}

unsafe extern "C" fn f_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, || {
        let w = wc(f);
        (w.inner_methods().xCheckReservedLock.unwrap())(w.inner, out)
    })
}

unsafe extern "C" fn f_file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    guard(ffi::SQLITE_ERROR, || {
        let w = wc(f);
        if op == ffi::SQLITE_FCNTL_PRAGMA && matches!(w.kind, FileKind::MainDb | FileKind::TempDb) {
            let a = arg as *mut *mut c_char;
            let name = cstr_opt(*a.add(1)).unwrap_or("");
            let value = cstr_opt(*a.add(2));
            let outcome = match (w.kind, w.state()) {
                (FileKind::MainDb, Some(state)) => state.pragma(name, value, w.readonly),
                _ => primary::pragma_on_unreplicable(name, "a temporary database"),
            };
            match outcome {
                PragmaOutcome::NotOurs => {}
                PragmaOutcome::Done(Some(text)) => {
                    *a = sqlite_string(&text);
                    return ffi::SQLITE_OK;
                }
                PragmaOutcome::Done(None) => {
                    // SQLite names the result column after the value: without
                    // one the column has no name, and drivers fail on that
                    // (Python's sqlite3 raised MemoryError). An empty text.
                    *a = sqlite_string("");
                    return ffi::SQLITE_OK;
                }
                PragmaOutcome::Fail(msg) => {
                    *a = sqlite_string(&format!("walcast: {msg}"));
                    return ffi::SQLITE_ERROR;
                }
            }
        }
        (w.inner_methods().xFileControl.unwrap())(w.inner, op, arg)
    })
}

unsafe extern "C" fn f_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    guard(4096, || {
        let w = wc(f);
        (w.inner_methods().xSectorSize.unwrap())(w.inner)
    })
}

unsafe extern "C" fn f_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    guard(0, || {
        let w = wc(f);
        (w.inner_methods().xDeviceCharacteristics.unwrap())(w.inner)
    })
}

unsafe extern "C" fn f_shm_map(f: *mut ffi::sqlite3_file, region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int {
    guard(ffi::SQLITE_IOERR_SHMMAP, || {
        let w = wc(f);
        let rc = (w.inner_methods().xShmMap.unwrap())(w.inner, region, size, extend, out);
        if rc == ffi::SQLITE_OK && region == 0 && !(*out).is_null() {
            if let Some(state) = w.state() {
                state.wal_index_mapped(*out as usize);
            }
        }
        rc
    })
}

/// Reads the wal-index header at `addr` (the first region of the -shm mapping).
/// It is accepted only as SQLite's readers accept it: both copies equal, the
/// checksum right, and initialized.
fn wal_index_header(addr: usize) -> Option<primary::WalIndexHeader> {
    if addr == 0 {
        return None;
    }
    // SAFETY: `addr` is this process's mapping of region 0 (at least 32 KiB), kept
    // mapped by the calling connection. Volatile: other processes write it.
    unsafe {
        let p = addr as *const u32;
        let copy = |base: usize| -> [u32; 12] { std::array::from_fn(|i| ptr::read_volatile(p.add(base + i))) };
        let (a, b) = (copy(0), copy(12));
        if a != b || a[0] != 3_007_000 || a[3] & 0xff == 0 {
            return None;
        }
        // aCksum covers the first 40 bytes, as native-order words.
        let mut bytes = [0u8; 40];
        for (i, w) in a[..10].iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        if crate::wal::wal_checksum(cfg!(target_endian = "big"), &bytes, (0, 0)) != (a[10], a[11]) {
            return None;
        }
        let sz = (a[3] >> 16) & 0xffff;
        let page_size = (sz & 0xfe00) | ((sz & 1) << 16);
        // The salts are kept as the WAL header's big-endian bytes.
        Some(primary::WalIndexHeader {
            max_frame: a[4],
            frame_cksum: (a[6], a[7]),
            salt1: u32::from_be(a[8]),
            salt2: u32::from_be(a[9]),
            page_size,
        })
    }
}

unsafe extern "C" fn f_shm_lock(f: *mut ffi::sqlite3_file, ofst: c_int, n: c_int, flags: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_SHMLOCK, || {
        let w = &mut *(f as *mut WcFile);
        if ofst == 0 && flags == (ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE) && w.read_slots != 0 {
            // A write transaction (its connection holds a read lock). Recovery and
            // checkpoints take the write lock without one, and stay allowed.
            if let Some(refusal) = w.state().and_then(|s| s.refuse_replica_write()) {
                primary::report(&refusal);
                return ffi::SQLITE_READONLY;
            }
        }
        let rc = (w.inner_methods().xShmLock.unwrap())(w.inner, ofst, n, flags);
        if rc == ffi::SQLITE_OK && (3..8).contains(&ofst) && flags & ffi::SQLITE_SHM_SHARED != 0 {
            let bits = (((1u16 << n.clamp(0, 8)) - 1) << (ofst - 3)) as u8;
            if flags & ffi::SQLITE_SHM_LOCK != 0 {
                w.read_slots |= bits;
            } else {
                w.read_slots &= !bits;
            }
        }
        if rc == ffi::SQLITE_OK && ofst == 0 && flags == (ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE) {
            if let Some(state) = w.state() {
                state.write_lock_acquired(|| wal_index_header(state.wal_index_addr()));
            }
        }
        // The checkpoint lock (WAL_CKPT_LOCK, taken alone): a checkpoint starts.
        if rc == ffi::SQLITE_OK && ofst == 1 && n == 1 && flags == (ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE) {
            if let Some(state) = w.state() {
                state.checkpoint_started();
            }
        }
        // Releasing the WAL write lock ends a write transaction (or a recovery, or
        // a checkpoint that restarted the WAL): wake the capture thread. O(1).
        if rc == ffi::SQLITE_OK && ofst == 0 && flags == (ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE) {
            if let Some(state) = w.state() {
                state.after_write_lock_released();
            }
        }
        rc
    })
}

unsafe extern "C" fn f_shm_barrier(f: *mut ffi::sqlite3_file) {
    guard((), || {
        let w = wc(f);
        (w.inner_methods().xShmBarrier.unwrap())(w.inner)
    })
}

unsafe extern "C" fn f_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    guard(ffi::SQLITE_IOERR_SHMMAP, || {
        let w = wc(f);
        (w.inner_methods().xShmUnmap.unwrap())(w.inner, delete)
    })
}

unsafe extern "C" fn f_fetch(f: *mut ffi::sqlite3_file, off: ffi::sqlite3_int64, amt: c_int, out: *mut *mut c_void) -> c_int {
    guard(ffi::SQLITE_IOERR_MMAP, || {
        let w = wc(f);
        (w.inner_methods().xFetch.unwrap())(w.inner, off, amt, out)
    })
}

unsafe extern "C" fn f_unfetch(f: *mut ffi::sqlite3_file, off: ffi::sqlite3_int64, p: *mut c_void) -> c_int {
    guard(ffi::SQLITE_IOERR_MMAP, || {
        let w = wc(f);
        (w.inner_methods().xUnfetch.unwrap())(w.inner, off, p)
    })
}

// ---------------------------------------------------------------------------
// A private handle on a database file, opened through the wrapped VFS.
//
// Reading the database file with a std::fs::File would be unsafe for SQLite:
// closing any descriptor of a file drops every POSIX lock this process holds on
// it. The wrapped (unix) VFS shares descriptors and lock state between handles of
// one file, so a handle of our own reads safely, and its shm locks exclude other
// connections exactly as a SQLite connection's do.

pub struct PrivateDb {
    mem: Vec<u64>,
    name: *const c_char,
    shm_open: std::cell::Cell<bool>,
    writer_locked: std::cell::Cell<bool>,
}

// SAFETY: the handle is used by one thread at a time (it is not Sync), and the
// unix VFS allows a file handle to move between threads.
unsafe impl Send for PrivateDb {}

impl PrivateDb {
    pub fn open(db_path: &str) -> io::Result<PrivateDb> {
        let c = CString::new(db_path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
        unsafe {
            let ivfs = inner_vfs();
            let words = ((*ivfs).szOsFile as usize).div_ceil(8);
            let mut mem = vec![0u64; words.max(1)];
            // The unix VFS keeps the name pointer and reads URI parameters through
            // it, so it must be a real SQLite filename that outlives the handle.
            let name = call!(create_filename(c.as_ptr(), c"".as_ptr(), c"".as_ptr(), 0, ptr::null_mut()));
            if name.is_null() {
                return Err(io::Error::new(io::ErrorKind::OutOfMemory, "sqlite3_create_filename failed"));
            }
            let file = mem.as_mut_ptr() as *mut ffi::sqlite3_file;
            let mut out = 0;
            let rc = ((*ivfs).xOpen.unwrap())(ivfs, name, file, ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_READWRITE, &mut out);
            if rc != ffi::SQLITE_OK || (*file).pMethods.is_null() {
                call!(free_filename(name));
                return Err(io::Error::other(format!("cannot open {db_path} (SQLite error {rc})")));
            }
            Ok(PrivateDb { mem, name, shm_open: Default::default(), writer_locked: Default::default() })
        }
    }

    fn file(&self) -> *mut ffi::sqlite3_file {
        self.mem.as_ptr() as *mut ffi::sqlite3_file
    }

    fn methods(&self) -> &ffi::sqlite3_io_methods {
        unsafe { &*(*self.file()).pMethods }
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as 0.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let rc = unsafe { (self.methods().xRead.unwrap())(self.file(), buf.as_mut_ptr() as *mut c_void, buf.len() as c_int, off as i64) };
        match rc {
            ffi::SQLITE_OK | ffi::SQLITE_IOERR_SHORT_READ => Ok(()),
            _ => Err(io::Error::other(format!("read of the database file failed (SQLite error {rc})"))),
        }
    }

    pub fn size(&self) -> io::Result<u64> {
        let mut sz: ffi::sqlite3_int64 = 0;
        let rc = unsafe { (self.methods().xFileSize.unwrap())(self.file(), &mut sz) };
        if rc != ffi::SQLITE_OK {
            return Err(io::Error::other(format!("size of the database file unknown (SQLite error {rc})")));
        }
        Ok(sz as u64)
    }

    /// Tries to take the WAL write lock (shm slot 0) without waiting, as a SQLite
    /// writer would. Ok(false) when another connection holds it.
    pub fn try_lock_writer(&self) -> io::Result<bool> {
        unsafe {
            let m = self.methods();
            if m.iVersion < 2 || m.xShmMap.is_none() {
                return Err(io::Error::other("the VFS has no shared memory"));
            }
            if !self.shm_open.get() {
                let mut p: *mut c_void = ptr::null_mut();
                let rc = (m.xShmMap.unwrap())(self.file(), 0, 32768, 0, &mut p);
                // Unmapping is harmless when nothing was mapped, so always do it.
                self.shm_open.set(true);
                if rc & 0xff == ffi::SQLITE_BUSY {
                    return Ok(false);
                }
                if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_READONLY {
                    return Err(io::Error::other(format!("cannot open the wal-index (SQLite error {rc})")));
                }
            }
            let rc = (m.xShmLock.unwrap())(self.file(), 0, 1, ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE);
            match rc {
                ffi::SQLITE_OK => {
                    self.writer_locked.set(true);
                    Ok(true)
                }
                ffi::SQLITE_BUSY => Ok(false),
                _ => Err(io::Error::other(format!("cannot take the WAL write lock (SQLite error {rc})"))),
            }
        }
    }

    /// What this database's wal-index says is committed, when it holds a valid
    /// header (None when no connection has initialized it: then SQLite's next
    /// reader recovers from the WAL file, as capture does).
    pub fn wal_index_mark(&self) -> Option<crate::claim::WalMark> {
        unsafe {
            let m = self.methods();
            if m.iVersion < 2 || m.xShmMap.is_none() {
                return None;
            }
            let mut p: *mut c_void = ptr::null_mut();
            let rc = (m.xShmMap.unwrap())(self.file(), 0, 32768, 0, &mut p);
            self.shm_open.set(true);
            if rc != ffi::SQLITE_OK || p.is_null() {
                return None;
            }
            // A writer updates the two copies one after the other: try again
            // when caught in between.
            for _ in 0..100 {
                if let Some(h) = wal_index_header(p as usize) {
                    return Some(crate::claim::WalMark { salt1: h.salt1, salt2: h.salt2, frame: h.max_frame });
                }
                std::thread::yield_now();
            }
            None
        }
    }

    /// Drops this handle's wal-index mapping (as a connection that closes does).
    pub fn release_shm(&self) {
        if self.shm_open.replace(false) {
            unsafe {
                (self.methods().xShmUnmap.unwrap())(self.file(), 0);
            }
        }
    }

    /// Takes a SHARED lock on the database file, the lock every connection in
    /// WAL mode holds from its first read until it closes. False if another
    /// connection holds a stronger lock.
    pub fn lock_shared(&self) -> bool {
        unsafe { (self.methods().xLock.unwrap())(self.file(), ffi::SQLITE_LOCK_SHARED) == ffi::SQLITE_OK }
    }

    pub fn unlock_writer(&self) {
        if self.writer_locked.get() {
            unsafe {
                let m = self.methods();
                (m.xShmLock.unwrap())(self.file(), 0, 1, ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE);
            }
            self.writer_locked.set(false);
        }
    }
}

impl Drop for PrivateDb {
    fn drop(&mut self) {
        self.unlock_writer();
        unsafe {
            let m = self.methods();
            if self.shm_open.get() {
                (m.xShmUnmap.unwrap())(self.file(), 0);
            }
            (m.xClose.unwrap())(self.file());
            call!(free_filename(self.name));
        }
    }
}

impl PrivateDb {
    /// Maps shm region `i` (creating it if needed), as a SQLite connection does.
    fn shm_map(&self, i: u32) -> io::Result<*mut u8> {
        unsafe {
            let m = self.methods();
            if m.iVersion < 2 || m.xShmMap.is_none() {
                return Err(io::Error::other("the VFS has no shared memory"));
            }
            let mut p: *mut c_void = ptr::null_mut();
            let rc = (m.xShmMap.unwrap())(self.file(), i as c_int, crate::walindex::REGION_SIZE as c_int, 1, &mut p);
            self.shm_open.set(true);
            if rc & 0xff == ffi::SQLITE_BUSY {
                // Another process is initializing the -shm file: try again.
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("wal-index region {i} is being initialized by another process"),
                ));
            }
            if rc != ffi::SQLITE_OK || p.is_null() {
                return Err(io::Error::other(format!("cannot map wal-index region {i} (SQLite error {rc})")));
            }
            Ok(p as *mut u8)
        }
    }

    fn shm_lock(&self, slot: u32, n: u32, flags: c_int) -> c_int {
        unsafe { (self.methods().xShmLock.unwrap())(self.file(), slot as c_int, n as c_int, flags) }
    }
}

/// The replica applier's handle on a database's wal-index: its regions as
/// atomics (other processes read and write them concurrently) and its locks.
pub struct ReplicaShm {
    db: PrivateDb,
    regions: Vec<usize>,
}

impl ReplicaShm {
    pub fn open(db_path: &str) -> io::Result<ReplicaShm> {
        Ok(ReplicaShm { db: PrivateDb::open(db_path)?, regions: Vec::new() })
    }
}

impl crate::walindex::Shm for ReplicaShm {
    fn region(&mut self, i: u32) -> io::Result<crate::walindex::Region<'_>> {
        let i = i as usize;
        if self.regions.len() <= i {
            self.regions.resize(i + 1, 0);
        }
        if self.regions[i] == 0 {
            self.regions[i] = self.db.shm_map(i as u32)? as usize;
        }
        let base = self.regions[i];
        // SAFETY: the VFS maps each region as 32 KiB of memory, aligned, that stays
        // mapped until xShmUnmap (in PrivateDb's drop, after these borrows end).
        // Other processes change it concurrently, so it is only seen as atomics.
        unsafe {
            let words = std::slice::from_raw_parts(base as *const std::sync::atomic::AtomicU32, 4096);
            let hash = std::slice::from_raw_parts((base + 16384) as *const std::sync::atomic::AtomicU16, 8192);
            Ok(crate::walindex::Region { words, hash })
        }
    }
}

impl crate::apply::ShmLocks for ReplicaShm {
    fn try_lock(&mut self, slot: u32, n: u32, exclusive: bool) -> io::Result<bool> {
        if self.regions.is_empty() {
            crate::walindex::Shm::region(self, 0)?;
        }
        let mode = if exclusive { ffi::SQLITE_SHM_EXCLUSIVE } else { ffi::SQLITE_SHM_SHARED };
        match self.db.shm_lock(slot, n, ffi::SQLITE_SHM_LOCK | mode) {
            ffi::SQLITE_OK => Ok(true),
            ffi::SQLITE_BUSY => Ok(false),
            rc => Err(io::Error::other(format!("cannot take wal-index lock {slot} (SQLite error {rc})"))),
        }
    }
    fn unlock(&mut self, slot: u32, n: u32, exclusive: bool) {
        let mode = if exclusive { ffi::SQLITE_SHM_EXCLUSIVE } else { ffi::SQLITE_SHM_SHARED };
        self.db.shm_lock(slot, n, ffi::SQLITE_SHM_UNLOCK | mode);
    }
}

/// The replica's files, as `replica.rs` uses them.
pub struct VfsReplicaFiles {
    pub db_path: String,
    conn: std::sync::Mutex<Option<Connection>>,
}

// SAFETY: the connection is used under the mutex, one thread at a time; SQLite
// connections may move between threads (SQLite is built threadsafe).
unsafe impl Send for VfsReplicaFiles {}
unsafe impl Send for Connection {}

impl VfsReplicaFiles {
    pub fn new(db_path: &str) -> VfsReplicaFiles {
        VfsReplicaFiles { db_path: db_path.into(), conn: std::sync::Mutex::new(None) }
    }
}

impl crate::replica::ReplicaFiles for VfsReplicaFiles {
    type Shm = ReplicaShm;
    fn open_shm(&self) -> io::Result<ReplicaShm> {
        ReplicaShm::open(&self.db_path)
    }
    fn sql(&self, sql: &str) -> Result<Option<String>, String> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(Connection::open_unhooked(&self.db_path)?);
        }
        g.as_ref().unwrap().query_text(sql)
    }
}

impl crate::capture::DbReader for PrivateDb {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        PrivateDb::read_at(self, buf, off)
    }
    fn size(&self) -> io::Result<u64> {
        PrivateDb::size(self)
    }
}

// ---------------------------------------------------------------------------
// A SQLite connection of walcast's own, used to switch a database to WAL mode.

pub struct Connection {
    db: *mut ffi::sqlite3,
}

impl Connection {
    pub fn open(path: &str) -> Result<Connection, String> {
        Self::open_vfs(path, VFS_NAME_C.as_ptr())
    }

    /// A connection through the wrapped VFS: walcast's hooks do not see it
    /// (the replica applier's own recovery and checkpoints).
    pub fn open_unhooked(path: &str) -> Result<Connection, String> {
        Self::open_vfs(path, unsafe { (*inner_vfs()).zName })
    }

    fn open_vfs(path: &str, vfs: *const c_char) -> Result<Connection, String> {
        let c = CString::new(path).map_err(|_| "path has a NUL byte".to_string())?;
        let mut db = ptr::null_mut();
        let rc = unsafe { call!(open_v2(c.as_ptr(), &mut db, ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE, vfs)) };
        let conn = Connection { db };
        if rc != ffi::SQLITE_OK {
            return Err(conn.errmsg(rc));
        }
        unsafe {
            call!(busy_timeout(db, 5000));
        }
        Ok(conn)
    }

    fn errmsg(&self, rc: c_int) -> String {
        if self.db.is_null() {
            return format!("SQLite error {rc}");
        }
        unsafe { cstr_opt(call!(errmsg(self.db))).unwrap_or("unknown error").to_string() }
    }

    /// Runs one statement and returns the first column of its first row, if any.
    pub fn query_text(&self, sql: &str) -> Result<Option<String>, String> {
        let c = CString::new(sql).map_err(|_| "SQL has a NUL byte".to_string())?;
        unsafe {
            let mut stmt = ptr::null_mut();
            let rc = call!(prepare_v2(self.db, c.as_ptr(), -1, &mut stmt, ptr::null_mut()));
            if rc != ffi::SQLITE_OK {
                return Err(self.errmsg(rc));
            }
            let rc = call!(step(stmt));
            let out =
                if rc == ffi::SQLITE_ROW { cstr_opt(call!(column_text(stmt, 0)) as *const c_char).map(|s| s.to_string()) } else { None };
            let done = rc == ffi::SQLITE_ROW || rc == ffi::SQLITE_DONE;
            let err = if done { None } else { Some(self.errmsg(rc)) };
            call!(finalize(stmt));
            match err {
                Some(e) => Err(e),
                None => Ok(out),
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.db.is_null() {
            unsafe {
                call!(close(self.db));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Connections and SQL functions

/// The walcast database behind a connection's main schema, or why there is none.
/// `db` is a connection handle SQLite passed to walcast (entry point or SQL
/// function context), valid for the duration of the call.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn state_of_connection(db: *mut ffi::sqlite3) -> Result<Arc<DbState>, String> {
    unsafe {
        let name = cstr_opt(call!(db_filename(db, c"main".as_ptr()))).unwrap_or("");
        if name.is_empty() {
            return Err(
                "this connection's database is in memory or temporary; open a database file after loading walcast (e.g. .open app.db)"
                    .into(),
            );
        }
        let mut vfs: *mut ffi::sqlite3_vfs = ptr::null_mut();
        let rc = call!(file_control(db, c"main".as_ptr(), ffi::SQLITE_FCNTL_VFS_POINTER, &mut vfs as *mut _ as *mut c_void));
        if rc != ffi::SQLITE_OK || vfs.is_null() {
            return Err("this connection's database is in memory, not a file opened through the walcast VFS".into());
        }
        if vfs != our_vfs() {
            let name = cstr_opt((*vfs).zName).unwrap_or("?");
            return Err(format!(
                "this connection's database was opened on the '{name}' VFS, not 'walcast' \
                 (it was opened before walcast was loaded, or with another vfs=): open it again, \
                 e.g. with .open in the sqlite3 shell"
            ));
        }
        let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
        let rc = call!(file_control(db, c"main".as_ptr(), ffi::SQLITE_FCNTL_FILE_POINTER, &mut file as *mut _ as *mut c_void));
        if rc != ffi::SQLITE_OK || file.is_null() || (*file).pMethods.is_null() {
            return Err("this connection's database file is not open yet".into());
        }
        let w = wc(file);
        match (w.kind, w.state()) {
            (FileKind::MainDb, Some(_)) => {
                Arc::increment_strong_count(w.state);
                Ok(Arc::from_raw(w.state))
            }
            _ => Err("this connection's database is temporary; walcast replicates only database files".into()),
        }
    }
}

/// Why a connection cannot take walcast pragmas; passed to the authorizer as its
/// user-data pointer (a small integer, so nothing is allocated per connection).
#[derive(Clone, Copy)]
#[repr(usize)]
enum GuardReason {
    OnWalcast = 1,
    InMemory = 2,
    OtherVfs = 3,
}

/// Installs walcast's pragma guard on a connection. SQLite ignores unknown pragmas
/// on a database that is not on the walcast VFS (an in-memory database, a
/// temporary schema, or a database opened before walcast was loaded), so
/// `PRAGMA walcast_role` would be accepted silently there; the guard denies it
/// and says why on stderr. `db` is the connection SQLite is initializing.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn install_pragma_guard(db: *mut ffi::sqlite3) {
    let reason = match state_of_connection(db) {
        Ok(_) => GuardReason::OnWalcast,
        Err(e) if e.contains("in memory") => GuardReason::InMemory,
        Err(_) => GuardReason::OtherVfs,
    };
    unsafe {
        call!(set_authorizer(db, Some(guard_authorizer), reason as usize as *mut c_void));
    }
}

unsafe extern "C" fn guard_authorizer(
    ud: *mut c_void,
    action: c_int,
    a1: *const c_char,
    _a2: *const c_char,
    schema: *const c_char,
    _trigger: *const c_char,
) -> c_int {
    guard(ffi::SQLITE_OK, || {
        if action != ffi::SQLITE_PRAGMA {
            return ffi::SQLITE_OK;
        }
        let name = cstr_opt(a1).unwrap_or("");
        if !name.to_ascii_lowercase().starts_with("walcast_") {
            return ffi::SQLITE_OK;
        }
        let schema = cstr_opt(schema).unwrap_or("main");
        let why = if schema.eq_ignore_ascii_case("temp") {
            "the temp schema is a temporary database; walcast replicates only database files"
        } else {
            match ud as usize {
                x if x == GuardReason::OnWalcast as usize => return ffi::SQLITE_OK,
                x if x == GuardReason::InMemory as usize => {
                    "this connection's database is in memory or temporary; open a database file after loading walcast (.open app.db)"
                }
                _ => "this connection's database was opened before walcast was loaded (or on another VFS); open it again (.open app.db)",
            }
        };
        primary::report(&format!("PRAGMA {name} refused: {why}"));
        ffi::SQLITE_DENY
    })
}

/// Registers `entry` (an extension entry point) to run on every new connection.
pub fn register_auto_extension(entry: usize) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| unsafe {
        // SAFETY: `entry` is an `extern "C"` entry point with the signature SQLite
        // calls auto-extensions with; SQLite declares the parameter as void(*)(void).
        let f: unsafe extern "C" fn() = std::mem::transmute(entry);
        call!(auto_extension(Some(f)));
    });
}

// ---------------------------------------------------------------------------
// System calls std does not offer, behind safe signatures.

/// Starts writing the dirty pages of `file` in `off..off + len` back to disk
/// and returns without waiting for them (sync_file_range SYNC_FILE_RANGE_WRITE).
/// A later fdatasync then finds them written, or in flight. Not a durability
/// barrier by itself.
pub fn start_writeback(file: &std::fs::File, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call's duration; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), off as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Milliseconds on a coarse monotonic clock (the kernel's tick, a few ms):
/// cheaper than a precise clock where only hundreds of milliseconds matter,
/// as in throttles on SQLite's commit path.
pub fn coarse_now_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Puts the calling thread below the application's threads (Linux: per
/// thread; threads it starts inherit both settings):
/// - nice `nice`, unless it is lower already;
/// - the SCHED_BATCH policy, unless it runs under another policy than the
///   default: its wake-ups do not preempt the thread running where it wakes.
///   It runs on a free CPU at once, or when that thread blocks or its time
///   slice ends, with the same share of the CPU as at nice `nice` otherwise.
///
/// Neither needs a privilege; raising the priority back would, so it is for
/// threads that only ever do background work. The first error is returned,
/// after both were tried.
pub fn lower_thread_priority(nice: i32) -> io::Result<()> {
    // SAFETY: no memory is passed; gettid cannot fail, and getpriority cannot
    // for the calling thread (so its -1 is a nice value, not an error).
    let tid = unsafe { libc::gettid() } as libc::id_t;
    let mut result = Ok(());
    // SAFETY: as above.
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) } < nice && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        result = Err(io::Error::last_os_error());
    }
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER {
        let param = libc::sched_param { sched_priority: 0 };
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 && result.is_ok() {
            result = Err(io::Error::last_os_error());
        }
    }
    result
}

/// The first `len` bytes of a file mapped shared (MAP_SHARED), read and
/// written as 32-bit atomic words: every process that maps the file sees every
/// store at once, with no system call. The file must stay at least `len`
/// bytes long while it is mapped.
pub struct SharedWords {
    ptr: *mut u32,
    words: usize,
}

// SAFETY: the mapping is only ever accessed through atomics.
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    pub fn map(file: &std::fs::File, len: usize) -> io::Result<SharedWords> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of an open descriptor; the result is checked.
        let p = unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedWords { ptr: p as *mut u32, words: len / 4 })
    }

    /// Word `i` (bytes 4i..4i+4) of the mapping.
    pub fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < self.words, "word {i} outside a mapping of {} words", self.words);
        // SAFETY: in bounds, 4-byte aligned (mmap returns page-aligned memory),
        // and mapped for as long as `self` lives.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.add(i)) }
    }

    /// Sleeps while word `i` holds `expected`, for at most `timeout`, or until
    /// `wake_all(i)` from any process that maps the same file: a futex on a
    /// shared mapping is keyed by the file and offset, not the address.
    pub fn wait_while(&self, i: usize, expected: u32, timeout: std::time::Duration) {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        self.futex(i, libc::FUTEX_WAIT, expected, &ts);
    }

    /// Wakes every thread, of any process, in `wait_while(i, ..)`.
    pub fn wake_all(&self, i: usize) {
        self.futex(i, libc::FUTEX_WAKE, i32::MAX as u32, ptr::null());
    }

    /// The futex operation `op` on word `i`; its outcome (woken, timed out,
    /// value changed, interrupted) needs no handling: callers look at the word
    /// again.
    fn futex(&self, i: usize, op: c_int, val: u32, timeout: *const libc::timespec) {
        // SAFETY: the word is mapped, aligned and lives as long as `self`;
        // `timeout` is null or outlives the call. Without FUTEX_PRIVATE_FLAG
        // the futex is the shared kind, which reaches other processes.
        unsafe {
            libc::syscall(libc::SYS_futex, self.word(i).as_ptr(), op, val, timeout, ptr::null::<u32>(), 0);
        }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference outlives `self`.
        unsafe {
            libc::munmap(self.ptr as *mut c_void, self.words * 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (nice, policy) of the calling thread.
    fn priority() -> (i32, i32) {
        // SAFETY: no memory is passed; both read the calling thread.
        unsafe { (libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t), libc::sched_getscheduler(0)) }
    }

    #[test]
    fn a_background_thread_runs_at_nice_10_as_a_batch_thread_unless_lower_already() {
        let default = std::thread::spawn(|| {
            lower_thread_priority(10).unwrap();
            priority()
        });
        assert_eq!(default.join().unwrap(), (10, libc::SCHED_BATCH));
        // A thread already lower, in nice and policy, stays as it was.
        let idle = std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` outlives the call.
            assert_eq!(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }, 0);
            // SAFETY: as in `priority`.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 15) }, 0);
            lower_thread_priority(10).unwrap();
            priority()
        });
        assert_eq!(idle.join().unwrap(), (15, libc::SCHED_IDLE));
    }
}
