// SPDX-License-Identifier: MIT
/*
 * How each open of a disk is served, and our own hook on the FUSE
 * device's I/O for two things libfuse 3.14 cannot do through its
 * high-level API: FUSE passthrough of complete disks, and answering a
 * cold read as soon as its bytes have arrived.
 * libfuse's custom I/O hook sees every request read from /dev/fuse and
 * every reply before it is written; each request is read and then served
 * by the same worker thread, which replies last.
 *
 * Passthrough.  On a kernel with it (Linux >= 6.9, CONFIG_FUSE_PASSTHROUGH)
 * and with CAP_SYS_ADMIN, a file opened with FOPEN_PASSTHROUGH is served
 * by the kernel straight from a backing file, here the disk's local image:
 * reads and writes never come to this daemon and use the image's own page
 * cache.  The first reply, INIT's, gains FUSE_PASSTHROUGH; the reply to an
 * open that fs_open_mode() chose for passthrough gains
 * FOPEN_PASSTHROUGH and the disk's backing id.
 *
 * Direct-io.  An incomplete disk is opened with FOPEN_DIRECT_IO: reads
 * skip the FUSE file's page cache and come to the daemon every time,
 * which serves present data from the image's page cache.  Page-cached,
 * a cold read would land in two page caches (the image's and the FUSE
 * file's); a cold sequential read ran at 0.6x curl that way against
 * 1.3-1.4x in direct-io mode (BENCHMARKS.md).  Re-reads of present data
 * pay a request each (about 9 GiB/s, 6 us for 4 KiB here, against 22
 * GiB/s and 1 us page-cached), and the same bytes are no longer cached
 * twice.
 * st_blksize (FS_IO_SIZE) has buffered readers ask for whole requests.
 * mmap, and on some kernels splice and sendfile, still go through the
 * FUSE file's page cache; direct-io writes invalidate what they cover.
 * Direct-io is used only when the kernel takes FUSE_DIRECT_IO_ALLOW_MMAP
 * (6.6), so that shared mmap works; -o nodirectio, an older kernel or a
 * missing device hook leave incomplete disks page-cached as before.
 * A disk that completes keeps its direct-io descriptors as they are.
 * The kernel keeps such descriptors out of its io-mode rule below, but
 * one that is mmapped shared joins the page-cached ones, so they count
 * against passthrough all the same.
 *
 * The kernel fails with EIO an open whose mode differs from the files
 * already open on that inode (passthrough against page-cached), so the
 * mode of each open is chosen here from the disk's open counts: only
 * read-only opens of a complete disk, all of it saved (saved_locked),
 * start passthrough, only while no page-cached or direct-io descriptor
 * is open, and every open made while a passthrough descriptor is open
 * gets passthrough too.  A writable one also gets FOPEN_DIRECT_IO,
 * which overrides passthrough for read and write: its writes still come
 * through the daemon, which keeps them inside the disk (the kernel would
 * let them grow the image) and counts them for fsync.
 * RELEASE reaches the daemon after the kernel has dropped the file, so
 * these counts are never below the kernel's and the rule holds.
 *
 * Early answers.  fs_answer_now() writes the reply to the READ this
 * thread is serving while the rest of its chunk is still on the wire;
 * the reply libfuse sends when the handler returns is then dropped here.
 * fs_answer_zeros() answers the same way, with zeros, a read of chunks
 * the cache stored as holes.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fs_i.h" /* first: FUSE_USE_VERSION */

#include <fuse_lowlevel.h>

#include "common/cleanup.h"
#include "log.h"

/* From Linux 6.9's <linux/fuse.h> (protocol 7.40); Debian 12's headers
 * are older. */
#define DIO_MMAP_INIT_FLAG2 (1u << (36 - 32)) /* FUSE_DIRECT_IO_ALLOW_MMAP (6.6) */
#define PT_INIT_FLAG2 (1u << (37 - 32))   /* FUSE_PASSTHROUGH in flags2 */
#define PT_FOPEN ((uint32_t)1 << 7)       /* FOPEN_PASSTHROUGH */
#define PT_FOPEN_ALLOWED (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES | FOPEN_NOFLUSH)
struct pt_backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
/* Backing ids are never closed: disks stay for the whole mount, and the
 * kernel drops them with the connection. */
#define PT_IOC_BACKING_OPEN _IOW(229, 1, struct pt_backing_map)

/* The INIT reply's max_stack_depth follows flags2 where 7.38 has unused[0]. */
_Static_assert(offsetof(struct fuse_init_out, unused) == 36, "fuse_init_out layout");
/* fuse_open_out's padding is 7.40's backing_id. */
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out layout");

static struct {
	int devfd;              /* the session's /dev/fuse, -1 when not installed */
	bool enabled;           /* passthrough wanted (not -o nopassthrough) */
	bool direct_io;         /* direct-io wanted (not -o nodirectio) */
	atomic_bool init_seen;  /* the first reply (INIT's) went out */
	atomic_bool offered;    /* the kernel was told we use passthrough */
	atomic_bool broken;     /* a backing open failed: never try again */
	atomic_bool dio_mmap_known;  /* INIT: the kernel knows FUSE_DIRECT_IO_ALLOW_MMAP */
	atomic_bool dio_usable;      /* ... and our INIT reply set it */
} pt = {.devfd = -1};

/* The open reply this thread is about to send, if chosen for passthrough. */
static _Thread_local struct {
	uint64_t fh;  /* 0 = none */
	int32_t backing_id;
	struct mount_disk *md;
} pending;

/* The request this thread read last, and so is serving. */
static _Thread_local struct {
	int fd;
	uint32_t opcode;
	uint64_t unique;
	bool answered;  /* fs_answer_now() replied: drop libfuse's reply */
} cur;

static void patch_init(struct iovec *iov, int count, struct fuse_init_out *copy)
{
	const struct fuse_out_header *oh = iov[0].iov_base;

	if (count != 2 || iov[0].iov_len != sizeof(*oh) || oh->error ||
	    iov[1].iov_len != sizeof(*copy))
		return;
	memcpy(copy, iov[1].iov_base, sizeof(*copy));
	if (copy->major != FUSE_KERNEL_VERSION || !(copy->flags & FUSE_INIT_EXT))
		return;
	/* Without it shared mmap of a direct-io file fails, so direct-io is
	 * used only where the kernel (>= 6.6) takes it. */
	if (atomic_load(&pt.dio_mmap_known)) {
		copy->flags2 |= DIO_MMAP_INIT_FLAG2;
		iov[1].iov_base = copy;
		atomic_store(&pt.dio_usable, true);
	}
	/* The kernel refuses passthrough alongside the writeback cache (which
	 * streamfs does not use). */
	if (!pt.enabled || (copy->flags & FUSE_WRITEBACK_CACHE))
		return;
	copy->flags2 |= PT_INIT_FLAG2;
	copy->unused[0] = 1; /* max_stack_depth: images sit on a plain filesystem */
	iov[1].iov_base = copy;
	atomic_store(&pt.offered, true);
}

/* An open reply this hook cannot patch must not open the file page-cached
 * while the counts say passthrough: fail that open with EIO instead. */
static void fail_open(struct iovec *iov, int *count, struct fuse_out_header *oh)
{
	log_err("disk %s: passthrough open reply not recognised; open failed",
		pending.md->name);
	memcpy(oh, iov[0].iov_base, sizeof(*oh));
	oh->len = sizeof(*oh);
	oh->error = -EIO;
	iov[0].iov_base = oh;
	*count = 1;
}

/* Returns false if it failed the open instead. */
static bool patch_open(struct iovec *iov, int *count, struct fuse_open_out *copy,
		       struct fuse_out_header *oh)
{
	const struct fuse_out_header *h = iov[0].iov_base;

	if (*count != 2 || iov[0].iov_len != sizeof(*h) || h->error ||
	    iov[1].iov_len != sizeof(*copy) ||
	    ((const struct fuse_open_out *)iov[1].iov_base)->fh != pending.fh) {
		fail_open(iov, count, oh);
		return false;
	}
	memcpy(copy, iov[1].iov_base, sizeof(*copy));
	/* The kernel takes no other flags with passthrough (keep_cache is
	 * meaningless there). */
	copy->open_flags = (copy->open_flags & PT_FOPEN_ALLOWED) | PT_FOPEN;
	copy->padding = (uint32_t)pending.backing_id;
	iov[1].iov_base = copy;
	return true;
}

static ssize_t devio_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	struct fuse_init_out init;
	struct fuse_open_out open;
	struct fuse_out_header oh;
	struct iovec v[2];
	bool failed = false;

	(void)userdata;
	if (cur.answered && count >= 1 && iov[0].iov_len == sizeof(struct fuse_out_header) &&
	    ((const struct fuse_out_header *)iov[0].iov_base)->unique == cur.unique) {
		cur.answered = false;
		return (ssize_t)iov[0].iov_len; /* the reader has its answer */
	}
	/* Never change libfuse's own array: patch a copy. */
	if (count == 2) {
		memcpy(v, iov, sizeof(v));
		if (!atomic_exchange(&pt.init_seen, true))
			patch_init(v, count, &init);
		else if (pending.fh)
			failed = !patch_open(v, &count, &open, &oh);
		iov = v;
	}
	uint64_t fh = pending.fh;
	pending.fh = 0;
	ssize_t r = writev(fd, iov, count);
	/* No RELEASE will come for the open failed here, unless the kernel
	 * had given up on it (ENOENT): libfuse releases it then. */
	if (failed && !(r < 0 && errno == ENOENT)) {
		int e = errno;
		fs_open_mode_release(pending.md, fh);
		errno = e;
	}
	return r;
}

static ssize_t devio_read(int fd, void *buf, size_t len, void *userdata)
{
	ssize_t n = read(fd, buf, len);

	(void)userdata;
	cur.answered = false;
	cur.unique = 0;
	cur.opcode = 0;
	if (n >= (ssize_t)sizeof(struct fuse_in_header)) {
		const struct fuse_in_header *in = buf;
		cur.fd = fd;
		cur.unique = in->unique;
		cur.opcode = in->opcode;
		/* Kernels before 7.36 send a shorter INIT without flags2. */
		const struct fuse_init_in *init = (const void *)(in + 1);
		if (in->opcode == FUSE_INIT &&
		    (size_t)n >= sizeof(*in) + offsetof(struct fuse_init_in, unused) &&
		    init->major == FUSE_KERNEL_VERSION && (init->flags & FUSE_INIT_EXT) &&
		    (init->flags2 & DIO_MMAP_INIT_FLAG2))
			atomic_store(&pt.dio_mmap_known, true);
	}
	return n;
}

static ssize_t devio_splice(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
			 unsigned int flags, void *userdata)
{
	(void)userdata;
	return splice(fdin, offin, fdout, offout, len, flags);
}

/* Replies to the READ this thread serves with the len bytes of iov[1..n),
 * iov[0] being left for the header. */
static bool answer_read(struct iovec *iov, int n, size_t len)
{
	struct fuse_out_header oh = {.len = (uint32_t)(sizeof(oh) + len), .unique = cur.unique};

	if (cur.opcode != FUSE_READ || !cur.unique || cur.answered)
		return false;
	iov[0] = (struct iovec){&oh, sizeof(oh)};
	/* ENOENT: the read was interrupted, and its caller has gone. */
	if (writev(cur.fd, iov, n) < 0 && errno != ENOENT)
		return false;
	cur.answered = true;
	return true;
}

bool fs_answer_now(void *opaque, const void *data, size_t len)
{
	struct iovec iov[2] = {[1] = {(void *)data, len}};

	(void)opaque;
	return answer_read(iov, 2, len);
}

bool fs_answer_zeros(size_t len)
{
	/* Never written: all its pages are the kernel's zero page. */
	static char zeros[256 * 1024];
	struct iovec iov[1 + 16];
	int n = 1;

	if (!fs_answer_ready() || len > (ARRAY_SIZE(iov) - 1) * sizeof(zeros))
		return false;
	for (size_t left = len; left; n++) {
		size_t k = MIN(left, sizeof(zeros));
		iov[n] = (struct iovec){zeros, k};
		left -= k;
	}
	return answer_read(iov, n, len);
}

bool fs_answer_ready(void)
{
	return pt.devfd >= 0;
}

int fs_devio_install(struct fuse_session *se)
{
	/* Requests are read with read(2), not spliced, so that the hook sees
	 * each one's header (requests are small: the high-level API copies
	 * written data anyway).  Replies are still spliced. */
	static const struct fuse_custom_io io = {
		.writev = devio_writev,
		.read = devio_read,
		.splice_send = devio_splice,
	};
	int fd = fuse_session_fd(se);
	int r = fuse_session_custom_io(se, &io, fd);

	if (r < 0)
		return r;
	pt.devfd = fd;
	return 0;
}

void fs_open_modes_enable(bool passthrough, bool direct_io)
{
	pt.enabled = passthrough;
	pt.direct_io = direct_io;
}

/* Locked by md->pt_lock.  Returns the disk's backing id, or 0. */
static int32_t backing_get_locked(struct mount_disk *md)
{
	if (md->backing_id > 0)
		return md->backing_id;
	struct pt_backing_map map = {.fd = cache_disk_fd(md->disk)};
	int id = ioctl(pt.devfd, PT_IOC_BACKING_OPEN, &map);
	if (id <= 0) {
		int e = id < 0 ? errno : EINVAL;
		/* Only what will not change gives up for good. */
		if (e != EPERM && e != ENOTTY && e != EOPNOTSUPP) {
			log_debug(LOG_SUB_FS, "disk %s: no passthrough for this open: %s",
				  md->name, strerror(e));
			return 0;
		}
		const char *why = e == EPERM ? "the kernel declined it, or no CAP_SYS_ADMIN"
					     : "the kernel has no FUSE passthrough";
		if (!atomic_exchange(&pt.broken, true))
			log_info("passthrough unavailable (%s): complete disks are served "
				 "through the daemon", why);
		return 0;
	}
	md->backing_id = id;
	log_debug(LOG_SUB_FS, "disk %s: passthrough backing id %d", md->name, id);
	return id;
}

/*
 * Whether every chunk of a complete disk is saved, saving them now if
 * not (a disk just completed, before the flusher's next sync).  Reads of
 * a passthrough descriptor never reach the daemon, so they could not fail
 * with EIO for chunks that a failed sync of the image then forgets; they
 * would read what the device kept instead.
 */
static bool saved_locked(struct mount_disk *md)
{
	if (!cache_disk_dirty(md->disk))
		return true;
	int r = cache_disk_sync(md->disk);
	if (r < 0)
		log_debug(LOG_SUB_FS, "disk %s: no passthrough: cannot save it: %s", md->name,
			  strerror(-r));
	return r == 0 && cache_disk_complete(md->disk);
}

void fs_open_mode(struct mount_disk *md, struct fuse_file_info *fi)
{
	bool rdonly = (fi->flags & O_ACCMODE) == O_RDONLY;
	LOCK_GUARD(&md->pt_lock);
	bool complete = cache_disk_complete(md->disk);
	int32_t id = 0;

	if (md->pt_opens)
		id = md->backing_id; /* the kernel wants every open like the others */
	else if (rdonly && !md->cached_opens && !md->direct_opens && atomic_load(&pt.offered) &&
		 pt.enabled && !atomic_load(&pt.broken) && complete && saved_locked(md))
		id = backing_get_locked(md);
	if (id > 0) {
		md->pt_opens++;
		md->cache_bypassed = true;
		fi->fh |= FS_FH_PASSTHROUGH;
		/* Reads and writes of a writable one go through the daemon (only
		 * its mmap goes to the image, behind the cache's back): see the
		 * top of this file. */
		if (!rdonly) {
			fi->direct_io = 1;
			cache_disk_forget_zeros(md->disk);
		}
		pending.fh = fi->fh;
		pending.backing_id = id;
		pending.md = md;
		return;
	}
	/* An incomplete disk is read in direct-io mode: see the top of this
	 * file.  So are new opens while such a descriptor is open, so that a
	 * page-cached descriptor and direct-io writes never meet (except
	 * after a failed sync, when writes fail). */
	if (md->direct_opens || (!complete && pt.direct_io && atomic_load(&pt.dio_usable))) {
		md->direct_opens++;
		md->cache_bypassed = true;
		fi->fh |= FS_FH_DIRECT;
		fi->direct_io = 1;
		return;
	}
	md->cached_opens++;
	/* Passthrough and direct-io writes bypass this inode's page cache
	 * (and a direct-io descriptor's private mmap may have filled it):
	 * drop what it kept from before. */
	if (md->cache_bypassed) {
		fi->keep_cache = 0;
		md->cache_bypassed = false;
	}
}

void fs_open_mode_release(struct mount_disk *md, uint64_t fh)
{
	LOCK_GUARD(&md->pt_lock);

	if (fh & FS_FH_PASSTHROUGH)
		md->pt_opens--;
	else if (fh & FS_FH_DIRECT)
		md->direct_opens--;
	else
		md->cached_opens--;
}
