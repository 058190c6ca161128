// SPDX-License-Identifier: MIT
/*
 * A disk's integrity manifest: its copy NAME.manifest in the image
 * directory (written at creation, opened with the disk), the check of
 * every fetched chunk against it, and verify.  Called from whatever thread
 * fills or verifies; reads the manifest file with pread, no lock needed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/endian.h"
#include "disk_i.h"
#include "manifest.h"
#include "util.h"

static void manifest_header(uint8_t *h, uint32_t chunk_size, uint64_t size, uint64_t chunks)
{
	memset(h, 0, MANIFEST_FILE_HEADER);
	memcpy(h, MANIFEST_FILE_MAGIC, 8);
	put_le32(h + 8, 1);
	put_le32(h + 12, chunk_size);
	put_le64(h + 16, size);
	put_le64(h + 24, chunks);
	put_le32(h + 32, meta_crc32c(h, 32));
}

/* Writes NAME.manifest (fsynced); removed again by the caller on failure. */
int disk_manifest_file_write(int dirfd, const char *path, const struct manifest *mf)
{
	uint8_t h[MANIFEST_FILE_HEADER];
	_cleanup_close_ int fd = openat(dirfd, path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	int r;

	if (fd < 0)
		return -errno;
	manifest_header(h, mf->chunk_size, mf->size, mf->chunks);
	r = full_pwrite(fd, h, sizeof(h), 0);
	if (r >= 0)
		r = full_pwrite(fd, mf->hashes, mf->chunks * MANIFEST_HASH_LEN, MANIFEST_FILE_HEADER);
	if (r >= 0 && fsync(fd) < 0)
		r = -errno;
	return r;
}

/* Sets the bits of the manifest's zero chunks in a new metadata file. */
int disk_preset_zero_chunks(int meta_fd, const struct manifest *mf)
{
	struct bitmap b;
	int r = bitmap_init(&b, mf->chunks);

	if (r < 0)
		return r;
	for (uint64_t i = 0; i < mf->chunks; i++)
		if (manifest_chunk_is_zero(mf, i))
			bitmap_set(&b, i);
	r = full_pwrite(meta_fd, b.bits, bitmap_bytes(mf->chunks), META_BITMAP_OFFSET);
	bitmap_destroy(&b);
	return r;
}

/* Opens and checks NAME.manifest against the disk's metadata. */
int disk_manifest_file_open(int dirfd, const char *name, const struct meta *m, char *why,
			      size_t why_size)
{
	char path[DISK_NAME_MAX + 16];
	uint8_t h[MANIFEST_FILE_HEADER], want[MANIFEST_FILE_HEADER];
	struct stat st;
	uint64_t chunks = meta_chunks(m);

	if (disk_name_path(path, sizeof(path), name, ".manifest") < 0)
		return -ENAMETOOLONG;
	_cleanup_close_ int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot open manifest %s: %s", path, strerror(e));
		return -e;
	}
	manifest_header(want, m->chunk_size, m->size, chunks);
	if (full_pread(fd, h, sizeof(h), 0) < 0 || memcmp(h, want, sizeof(h)) ||
	    fstat(fd, &st) < 0 ||
	    (uint64_t)st.st_size != MANIFEST_FILE_HEADER + chunks * MANIFEST_HASH_LEN) {
		snprintf(why, why_size, "manifest %s is corrupt or does not match the disk", path);
		return -EBADMSG;
	}
	return steal_fd(fd);
}

/* The manifest's hash of chunk idx; 0, or -errno. */
int disk_manifest_hash_of(const struct cache_disk *d, uint64_t idx, uint8_t *out)
{
	return full_pread(d->manifest_fd, out, MANIFEST_HASH_LEN,
			  MANIFEST_FILE_HEADER + idx * MANIFEST_HASH_LEN);
}

bool cache_disk_has_manifest(const struct cache_disk *d)
{
	return d->manifest_fd >= 0;
}

/*
 * Checks the fetched chunks [a, b] in buf against the manifest.  Returns
 * 0, -EILSEQ with *ret_bad set to the first mismatching chunk, or -errno.
 */
int disk_verify_run(struct cache_disk *d, const uint8_t *buf, uint64_t a, uint64_t b,
		      uint64_t *ret_bad)
{
	uint8_t want[MANIFEST_HASH_LEN], got[MANIFEST_HASH_LEN];
	int r;

	if (d->manifest_fd < 0)
		return 0;
	for (uint64_t i = a; i <= b; i++) {
		const uint8_t *chunk = buf + ((i - a) << d->chunk_shift);
		uint64_t len = disk_chunk_len(d, i);
		r = disk_manifest_hash_of(d, i, want);
		if (r < 0)
			return r;
		if (buf_is_zero(want, sizeof(want)))
			r = buf_is_zero(chunk, len) ? 0 : -EILSEQ;
		else if ((r = manifest_sha256(chunk, len, got)) == 0)
			r = memcmp(want, got, sizeof(got)) ? -EILSEQ : 0;
		if (r == -EILSEQ)
			*ret_bad = i;
		if (r < 0)
			return r;
	}
	return 0;
}

int64_t cache_disk_verify(struct cache_disk *d, uint64_t *out, size_t nout, uint64_t *ret_checked,
			  uint64_t *ret_written)
{
	uint64_t checked = 0, written = 0;
	int64_t bad = 0;

	if (d->manifest_fd < 0)
		return -ENOENT;
	_cleanup_free_ uint8_t *buf = malloc(d->chunk_size);
	if (!buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < d->nchunks; i++) {
		uint64_t mismatch;
		pthread_mutex_lock(&d->lock);
		bool present = bitmap_get(&d->present, i);
		bool changed = bitmap_get(&d->written, i);
		pthread_mutex_unlock(&d->lock);
		if (!present)
			continue;
		if (changed) {
			written++;
			continue;
		}
		int r = full_pread(d->img_fd, buf, disk_chunk_len(d, i), i << d->chunk_shift);
		if (r >= 0)
			r = disk_verify_run(d, buf, i, i, &mismatch);
		if (r == -EILSEQ) {
			/* Written while it was read (the bit is set first)? */
			pthread_mutex_lock(&d->lock);
			changed = bitmap_get(&d->written, i);
			pthread_mutex_unlock(&d->lock);
			if (changed) {
				written++;
				continue;
			}
			if ((size_t)bad < nout)
				out[bad] = i << d->chunk_shift;
			bad++;
		} else if (r < 0) {
			return r;
		}
		checked++;
	}
	*ret_checked = checked;
	*ret_written = written;
	return bad;
}
