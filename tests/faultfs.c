/* faultfs: an LD_PRELOAD shim that makes writes and syncs of chosen files fail,
 * for tests/test_resource_faults.py (which compiles it with gcc).
 *
 * A file descriptor is "watched" when its path (readlink /proc/self/fd/N, read
 * when the file is opened and cached until it is closed) matches
 * FAULTFS_PATTERN, an fnmatch(3) glob such as "*.db-walcast".
 * While the file FAULTFS_TRIGGER exists, watched calls fail, so a test injects
 * by creating it and heals by removing it. Environment:
 *
 *   FAULTFS_PATTERN  glob matched against the whole path (required)
 *   FAULTFS_TRIGGER  faults only while this path exists (default: always)
 *   FAULTFS_OPS      comma list of write,pwrite,fsync,fdatasync,ftruncate
 *                    (default: write,pwrite,fsync,fdatasync)
 *   FAULTFS_AFTER    let this many watched calls succeed (per process, counted
 *                    while triggered) before failing (default 0)
 *   FAULTFS_PROB     probability of failing each call after that (default 1)
 *   FAULTFS_ERRNO    errno to fail with: EIO (default), ENOSPC, EDQUOT or a number
 *   FAULTFS_TORN     1: a failing write first writes half its bytes for real and
 *                    returns that short count; the next write through that
 *                    descriptor then fails, as on a filling disk
 *   FAULTFS_GROWTH_ONLY  1: writes within the blocks the file has (st_blocks)
 *                    succeed; only writes that need new blocks fail (a full
 *                    disk: existing blocks can be rewritten, new ones cannot
 *                    be had)
 *   FAULTFS_LOG      append one line per injected fault here
 *
 * Only the calls below are wrapped; everything else passes through. The shim
 * never writes through a watched descriptor itself.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
enum { UNKNOWN = 0, WATCHED = 1, IGNORED = 2 };
enum { OP_WRITE = 1, OP_PWRITE = 2, OP_FSYNC = 4, OP_FDATASYNC = 8, OP_FTRUNCATE = 16 };

static _Atomic unsigned char fd_state[MAX_FD];
/* A torn write returned a short count on this descriptor: the next write fails. */
static _Atomic unsigned char owes_error[MAX_FD];
static pthread_once_t once = PTHREAD_ONCE_INIT;
static const char *pattern, *trigger, *logpath;
static unsigned ops = OP_WRITE | OP_PWRITE | OP_FSYNC | OP_FDATASYNC;
static long after;
static double prob = 1.0;
static int fail_errno = EIO, torn, growth_only;
static _Atomic long calls_seen, faults_injected;
static _Atomic uint64_t rng = 0x9e3779b97f4a7c15ull;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_close)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);

static void init(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    pattern = getenv("FAULTFS_PATTERN");
    trigger = getenv("FAULTFS_TRIGGER");
    logpath = getenv("FAULTFS_LOG");
    const char *s;
    if ((s = getenv("FAULTFS_OPS")) && *s) {
        ops = 0;
        if (strstr(s, "pwrite")) ops |= OP_PWRITE;
        /* "write" alone, not as part of "pwrite" */
        for (const char *p = s; (p = strstr(p, "write")); p += 5)
            if (p == s || p[-1] == ',') ops |= OP_WRITE;
        if (strstr(s, "fdatasync")) ops |= OP_FDATASYNC;
        for (const char *p = s; (p = strstr(p, "fsync")); p += 5)
            if (p == s || p[-1] == ',') ops |= OP_FSYNC;
        if (strstr(s, "ftruncate")) ops |= OP_FTRUNCATE;
    }
    if ((s = getenv("FAULTFS_AFTER"))) after = atol(s);
    if ((s = getenv("FAULTFS_PROB"))) prob = atof(s);
    if ((s = getenv("FAULTFS_TORN"))) torn = atoi(s);
    if ((s = getenv("FAULTFS_GROWTH_ONLY"))) growth_only = atoi(s);
    if ((s = getenv("FAULTFS_ERRNO")) && *s) {
        if (!strcmp(s, "EIO")) fail_errno = EIO;
        else if (!strcmp(s, "ENOSPC")) fail_errno = ENOSPC;
        else if (!strcmp(s, "EDQUOT")) fail_errno = EDQUOT;
        else fail_errno = atoi(s);
    }
    uint64_t seed = (uint64_t)getpid() * 0x100000001b3ull ^ (uint64_t)time(NULL);
    atomic_store(&rng, seed | 1);
}

static void classify(int fd) {
    if (fd < 0 || fd >= MAX_FD) return;
    unsigned char st = IGNORED;
    if (pattern) {
        char link[64], path[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = 0;
            if (fnmatch(pattern, path, 0) == 0) st = WATCHED;
        }
    }
    atomic_store(&fd_state[fd], st);
}

static int watched(int fd) {
    pthread_once(&once, init);
    if (!pattern || fd < 0 || fd >= MAX_FD) return 0;
    unsigned char st = atomic_load(&fd_state[fd]);
    if (st == UNKNOWN) {
        /* Opened before the shim saw it (or through a call it does not wrap). */
        classify(fd);
        st = atomic_load(&fd_state[fd]);
    }
    return st == WATCHED;
}

static double uniform(void) {
    uint64_t x = atomic_load(&rng), y;
    do {
        y = x;
        y ^= y << 13;
        y ^= y >> 7;
        y ^= y << 17;
    } while (!atomic_compare_exchange_weak(&rng, &x, y));
    return (double)(y >> 11) / (double)(1ull << 53);
}

static void note(const char *op, int fd, size_t len, off_t off, int short_write) {
    long n = atomic_fetch_add(&faults_injected, 1) + 1;
    if (!logpath) return;
    char path[4096] = "?", link[64], line[4400];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, path, sizeof path - 1);
    if (k > 0) path[k] = 0;
    char what[64];
    if (short_write) snprintf(what, sizeof what, "short write of %zu bytes", len / 2);
    else snprintf(what, sizeof what, "failed with errno %d", fail_errno);
    int m = snprintf(line, sizeof line, "pid %d fault %ld: %s %s len %zu off %lld: %s\n", (int)getpid(), n, op, path, len,
                     (long long)off, what);
    int lfd = (int)syscall(SYS_open, logpath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (lfd >= 0) {
        if (m > 0) (void)!syscall(SYS_write, lfd, line, (size_t)m);
        syscall(SYS_close, lfd);
    }
}

/* Whether this watched call fails. */
static int should_fail(int fd, unsigned op) {
    if (!(ops & op)) return 0;
    if ((op & (OP_WRITE | OP_PWRITE)) && atomic_exchange(&owes_error[fd], 0)) return 2;
    if (trigger) {
        struct stat sb;
        if (stat(trigger, &sb) != 0) return 0;
    }
    long seen = atomic_fetch_add(&calls_seen, 1);
    if (seen < after) return 0;
    return prob >= 1.0 || uniform() < prob;
}

/* With FAULTFS_GROWTH_ONLY: whether writing len bytes at off (-1: the file
 * position) stays within the blocks the file has. */
static int within_size(int fd, size_t len, off_t off) {
    struct stat sb;
    if (!growth_only || fstat(fd, &sb) != 0) return 0;
    if (off < 0) {
        off = (fcntl(fd, F_GETFL) & O_APPEND) ? sb.st_size : lseek(fd, 0, SEEK_CUR);
        if (off < 0) return 0;
    }
    return off + (off_t)len <= (off_t)sb.st_blocks * 512;
}

ssize_t write(int fd, const void *buf, size_t len) {
    int f = watched(fd) && !within_size(fd, len, -1) ? should_fail(fd, OP_WRITE) : 0;
    if (f) {
        note("write", fd, len, -1, torn && f == 1 && len > 1);
        if (torn && f == 1 && len > 1) {
            atomic_store(&owes_error[fd], 1);
            return real_write(fd, buf, len / 2);
        }
        errno = fail_errno;
        return -1;
    }
    return real_write(fd, buf, len);
}

static ssize_t do_pwrite(ssize_t (*real)(int, const void *, size_t, off_t), const char *name, int fd, const void *buf,
                         size_t len, off_t off) {
    int f = watched(fd) && !within_size(fd, len, off) ? should_fail(fd, OP_PWRITE) : 0;
    if (f) {
        note(name, fd, len, off, torn && f == 1 && len > 1);
        if (torn && f == 1 && len > 1) {
            atomic_store(&owes_error[fd], 1);
            return real(fd, buf, len / 2, off);
        }
        errno = fail_errno;
        return -1;
    }
    return real(fd, buf, len, off);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    pthread_once(&once, init);
    return do_pwrite(real_pwrite, "pwrite", fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
    pthread_once(&once, init);
    return do_pwrite(real_pwrite64, "pwrite64", fd, buf, len, off);
}

int fsync(int fd) {
    if (watched(fd) && should_fail(fd, OP_FSYNC)) {
        note("fsync", fd, 0, -1, 0);
        errno = fail_errno;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    if (watched(fd) && should_fail(fd, OP_FDATASYNC)) {
        note("fdatasync", fd, 0, -1, 0);
        errno = fail_errno;
        return -1;
    }
    return real_fdatasync(fd);
}

int ftruncate(int fd, off_t len) {
    if (watched(fd) && should_fail(fd, OP_FTRUNCATE)) {
        note("ftruncate", fd, 0, len, 0);
        errno = fail_errno;
        return -1;
    }
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len) {
    if (watched(fd) && should_fail(fd, OP_FTRUNCATE)) {
        note("ftruncate64", fd, 0, len, 0);
        errno = fail_errno;
        return -1;
    }
    return real_ftruncate64(fd, len);
}

int close(int fd) {
    pthread_once(&once, init);
    if (fd >= 0 && fd < MAX_FD) {
        atomic_store(&fd_state[fd], UNKNOWN);
        atomic_store(&owes_error[fd], 0);
    }
    return real_close(fd);
}

static int opened(int fd) {
    if (fd >= 0 && fd < MAX_FD) atomic_store(&owes_error[fd], 0);
    if (fd >= 0) classify(fd);
    return fd;
}

/* The mode argument is only present with O_CREAT or O_TMPFILE. */
#define MODE_ARG(flags)                                                         \
    mode_t mode = 0;                                                            \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                      \
        va_list ap;                                                             \
        va_start(ap, flags);                                                    \
        mode = (mode_t)va_arg(ap, int);                                         \
        va_end(ap);                                                             \
    }

int open(const char *path, int flags, ...) {
    pthread_once(&once, init);
    MODE_ARG(flags);
    return opened(real_open(path, flags, mode));
}

int open64(const char *path, int flags, ...) {
    pthread_once(&once, init);
    MODE_ARG(flags);
    return opened(real_open64(path, flags, mode));
}

int openat(int dirfd, const char *path, int flags, ...) {
    pthread_once(&once, init);
    MODE_ARG(flags);
    return opened(real_openat(dirfd, path, flags, mode));
}

int openat64(int dirfd, const char *path, int flags, ...) {
    pthread_once(&once, init);
    MODE_ARG(flags);
    return opened(real_openat64(dirfd, path, flags, mode));
}
