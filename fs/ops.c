// SPDX-License-Identifier: MIT
/*
 * FUSE operations of the mount: a flat directory holding one regular file
 * per disk and the control file.  Called from libfuse's worker threads;
 * reads of present data are answered with an fd-backed buffer so that the
 * kernel splices them from the local image without a copy through here.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs_i.h"
#include "log.h"

/* With nullpath_ok, open files are known by fi->fh alone (path may be
 * NULL): a disk's fh is its struct mount_disk, a control file's is its
 * session with the low bit set (see control.c). */
static bool fh_is_control(const struct fuse_file_info *fi)
{
	return fi && (fi->fh & FS_FH_CONTROL);
}

static struct mount_disk *disk_of(const char *path, struct fuse_file_info *fi)
{
	if (fi && fi->fh)
		return fh_is_control(fi) ? NULL
					 : (struct mount_disk *)(uintptr_t)(fi->fh & ~FS_FH_FLAGS);
	return path ? mount_find_path(mount_ctx_get(), path) : NULL;
}

static bool is_control(const char *path)
{
	return path && !strcmp(path, "/" CONTROL_NAME);
}

/* Errors a FUSE caller should see: local trouble as is, the rest as EIO. */
static int user_errno(int r)
{
	switch (r) {
	case -ENOMEM:
	case -ENOSPC:
	case -EDQUOT:
	case -EROFS:
	case -EIO:
	case -EINTR:
		return r;
	default:
		return -EIO;
	}
}

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	struct mount_ctx *m = mount_ctx_get();
	struct mount_disk *md;
	struct stat img;

	memset(st, 0, sizeof(*st));
	st->st_atim = st->st_mtim = st->st_ctim = m->started;
	if (fh_is_control(fi) || (!fi && is_control(path))) {
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
		st->st_uid = m->owner;
		st->st_gid = m->group;
		return 0;
	}
	if (!fi && !strcmp(path, "/")) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		st->st_uid = m->owner;
		st->st_gid = m->group;
		return 0;
	}
	md = disk_of(path, fi);
	if (!md)
		return -ENOENT;
	if (fstat(cache_disk_fd(md->disk), &img) < 0)
		return -errno;
	/* The disk shows its local image's owner, mode and times: chmod or
	 * chown the image (or the disk) to decide who may open it.  Under
	 * readonly too, as on a filesystem mounted read-only: opens for
	 * writing fail with EROFS, and the owner may still set
	 * user.streamfs.speed (the kernel asks write permission for it). */
	*st = img;
	st->st_ino = 0;
	st->st_mode = S_IFREG | (img.st_mode & 07777);
	st->st_nlink = 1;
	st->st_size = (off_t)cache_disk_size(md->disk);
	/* Buffered readers (stdio, cmp, cp) size their reads by this: in
	 * direct-io mode each read is a request to the daemon. */
	st->st_blksize = FS_IO_SIZE;
	return 0;
}

static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	struct mount_ctx *m = mount_ctx_get();
	size_t n = 0;

	(void)off;
	(void)fi;
	(void)flags;
	if (path && strcmp(path, "/")) /* NULL under nullpath_ok: the root */
		return -ENOTDIR;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	fill(buf, CONTROL_NAME, NULL, 0, 0);
	struct mount_disk **list = mount_list(m, &n);
	if (!list)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		fill(buf, list[i]->name, NULL, 0, 0);
	free(list);
	return 0;
}

static int fs_open(const char *path, struct fuse_file_info *fi)
{
	struct mount_ctx *m = mount_ctx_get();

	if (is_control(path))
		return fs_control_open(fi);
	struct mount_disk *md = mount_find_path(m, path);
	if (!md)
		return -ENOENT;
	if ((fi->flags & O_ACCMODE) != O_RDONLY && m->opts.readonly)
		return -EROFS;
	fi->fh = (uintptr_t)md;
	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		fi->fh |= FS_FH_WRITABLE; /* FLUSH carries no open flags */
	/* The page cache cannot go stale: every change to a disk's bytes
	 * comes through this mount, and absent data are never cached. */
	fi->keep_cache = 1;
	fs_open_mode(md, fi);
	return 0;
}

static int fs_read_buf(const char *path, struct fuse_bufvec **bufp, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct mount_disk *md;
	int r;

	(void)path;
	if (fh_is_control(fi))
		return fs_control_read_buf(bufp, size, off, fi);
	md = disk_of(NULL, fi);
	if (!md || off < 0)
		return -EBADF;
	uint64_t disk_size = cache_disk_size(md->disk);
	if ((uint64_t)off >= disk_size)
		size = 0;
	else if (size > disk_size - (uint64_t)off)
		size = (size_t)(disk_size - (uint64_t)off);
	void *data = NULL;
	if (size) {
		r = cache_disk_prepare_read(md->disk, (uint64_t)off, size, &data,
					    fs_answer_ready() ? fs_answer_now : NULL, NULL);
		/* Holes are answered from zeros: splicing them from the image
		 * would have the kernel zero page-cache pages for them first. */
		if (r == 1 || (r == CACHE_READ_ZEROS && fs_answer_zeros(size)))
			size = 0; /* answered already; this reply is dropped */
		if (r < 0) {
			log_debug(LOG_SUB_FS, "read %s at %lld: %s", md->name, (long long)off,
				  strerror(-r));
			/* A read that cannot be served is an I/O error to a VM,
			 * whatever the cause (the reason is in user.streamfs.error). */
			return r == -ENOMEM || r == -EINTR ? r : -EIO;
		}
	}
	struct fuse_bufvec *bv = malloc(sizeof(*bv));
	if (!bv) {
		free(data);
		return -ENOMEM;
	}
	*bv = FUSE_BUFVEC_INIT(size);
	if (data || !size) {
		/* Just fetched: answered from memory, libfuse frees it. */
		bv->buf[0].mem = data;
	} else {
		bv->buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY;
		bv->buf[0].fd = cache_disk_fd(md->disk);
		bv->buf[0].pos = off;
	}
	*bufp = bv;
	return 0;
}

static int fs_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct mount_ctx *m = mount_ctx_get();

	if (fh_is_control(fi))
		return fs_control_write(buf, size, fi);
	if (m->opts.readonly)
		return -EROFS;
	struct mount_disk *md = disk_of(path, fi);
	if (!md || off < 0)
		return -EBADF;
	int r = cache_disk_write(md->disk, buf, size, (uint64_t)off);
	return r < 0 ? user_errno(r) : r;
}

static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)datasync;
	if (fh_is_control(fi))
		return 0;
	struct mount_disk *md = disk_of(path, fi);
	if (!md)
		return -EBADF;
	int r = cache_disk_sync(md->disk);
	if (r < 0)
		log_err("disk %s: fsync failed: %s", md->name, strerror(-r));
	return r < 0 ? user_errno(r) : 0;
}

static int fs_flush(const char *path, struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(NULL, fi);

	if (!md)
		return 0;
	/* close(2) of a descriptor that can write makes the disk's writes
	 * durable (streamfs(1), WRITES AND DURABILITY).  It syncs even when
	 * nothing looks dirty (cheap on a clean image): its mmap writes may
	 * have gone straight to the image (passthrough).  A read-only one has
	 * nothing to make durable; what it had fetched is committed by the
	 * flusher, and an fdatasync of a freshly streamed image would make
	 * its close(2) take seconds. */
	if (!(fi->fh & FS_FH_WRITABLE))
		return 0;
	return fs_fsync(path, 1, fi);
}

static int fs_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	if (fh_is_control(fi))
		fs_control_release(fi);
	else if (fi->fh)
		fs_open_mode_release(disk_of(NULL, fi), fi->fh);
	return 0;
}

static int fs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md)
		return is_control(path) || fh_is_control(fi) ? 0 : -ENOENT;
	if (mount_ctx_get()->opts.readonly)
		return -EROFS;
	/* A disk's size is its template's; it never changes. */
	return (uint64_t)size == cache_disk_size(md->disk) ? 0 : -EPERM;
}

static int fs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md)
		return -EPERM;
	return fchmod(cache_disk_fd(md->disk), mode & 07777) < 0 ? -errno : 0;
}

static int fs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md)
		return -EPERM;
	return fchown(cache_disk_fd(md->disk), uid, gid) < 0 ? -errno : 0;
}

static int fs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md)
		return is_control(path) || fh_is_control(fi) ? 0 : -ENOENT;
	return futimens(cache_disk_fd(md->disk), tv) < 0 ? -errno : 0;
}

static int fs_fallocate(const char *path, int mode, off_t off, off_t len,
			struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md || off < 0 || len <= 0)
		return md ? -EINVAL : -EBADF;
	if (mount_ctx_get()->opts.readonly)
		return -EROFS;
	uint64_t end = (uint64_t)off + (uint64_t)len;
	/* Making room inside the disk: nothing to do, every byte exists. */
	if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE)
		return end <= cache_disk_size(md->disk) || mode ? 0 : -EPERM;
	/* Discard (QEMU's discard=unmap) and write-zeroes read as zeros. */
	if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) ||
	    mode == FALLOC_FL_ZERO_RANGE || mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
		if (!(mode & FALLOC_FL_KEEP_SIZE) && end > cache_disk_size(md->disk))
			return -EPERM;
		int r = cache_disk_zero(md->disk, (uint64_t)off, (uint64_t)len);
		return r < 0 ? user_errno(r) : 0;
	}
	return -EOPNOTSUPP;
}

static int fs_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	/* df on the mount shows the space left for local images. */
	return fstatvfs(mount_ctx_get()->dirfd, st) < 0 ? -errno : 0;
}

static off_t fs_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
	struct mount_disk *md = disk_of(path, fi);

	if (!md)
		return -EINVAL;
	if (whence == SEEK_DATA || whence == SEEK_HOLE) {
		if (off < 0)
			return -ENXIO;
		return (off_t)cache_disk_lseek(md->disk, (uint64_t)off, whence);
	}
	if (whence == SEEK_SET)
		return off;
	if (whence == SEEK_END)
		return (off_t)cache_disk_size(md->disk) + off;
	return -EINVAL;
}

static int fs_deny(void)
{
	return -EPERM;
}

static int fs_mknod(const char *path, mode_t mode, dev_t dev)
{
	(void)path, (void)mode, (void)dev;
	return fs_deny();
}

static int fs_mkdir(const char *path, mode_t mode)
{
	(void)path, (void)mode;
	return fs_deny();
}

static int fs_unlink(const char *path)
{
	(void)path;
	return fs_deny();
}

static int fs_rename(const char *from, const char *to, unsigned int flags)
{
	(void)from, (void)to, (void)flags;
	return fs_deny();
}

static int fs_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	(void)path, (void)mode, (void)fi;
	return fs_deny();
}

static void *fs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	cfg->nullpath_ok = 1;
	cfg->use_ino = 0;
	cfg->entry_timeout = 1.0;
	cfg->attr_timeout = 1.0;
	cfg->negative_timeout = 0;
	cfg->hard_remove = 1;
	/* Let libfuse splice fd-backed replies straight to the kernel.  Not
	 * SPLICE_MOVE: the kernel would try to steal each page of the image
	 * into the FUSE file's cache, which locks it, waits for its writeback
	 * and fails anyway for a page still dirty from the fetch; reading a
	 * 2 GiB disk through the daemon took 10-40 % longer with it. */
	if (conn->capable & FUSE_CAP_SPLICE_WRITE)
		conn->want |= FUSE_CAP_SPLICE_WRITE;
	conn->max_read = FS_IO_SIZE; /* as mounted with max_read= (main.c) */
	conn->want &= ~(unsigned)FUSE_CAP_ATOMIC_O_TRUNC;
	/* Every change to a disk comes through this mount, so the kernel's
	 * cache is never stale: do not drop it when the local image's mtime
	 * moves (it does, as the streamer writes). */
	conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;
	return fuse_get_context()->private_data;
}

const struct fuse_operations fs_ops = {
	.init = fs_init,
	.getattr = fs_getattr,
	.readdir = fs_readdir,
	.open = fs_open,
	.read_buf = fs_read_buf,
	.write = fs_write,
	.fsync = fs_fsync,
	.flush = fs_flush,
	.release = fs_release,
	.truncate = fs_truncate,
	.chmod = fs_chmod,
	.chown = fs_chown,
	.utimens = fs_utimens,
	.statfs = fs_statfs,
	.fallocate = fs_fallocate,
	.lseek = fs_lseek,
	.mknod = fs_mknod,
	.mkdir = fs_mkdir,
	.unlink = fs_unlink,
	.rename = fs_rename,
	.create = fs_create,
	.getxattr = fs_getxattr,
	.setxattr = fs_setxattr,
	.listxattr = fs_listxattr,
};
