/* SPDX-License-Identifier: MIT */
/*
 * Private declarations of cache/: the present-bitmap, the metadata codec
 * and file layout.  Pure data structures: the callers provide locking.
 */
#ifndef STREAMFS_CACHE_I_H
#define STREAMFS_CACHE_I_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* --- bitmap.c: one bit per chunk --- */

struct bitmap {
	uint8_t *bits;  /* bit i is bits[i / 8] & (1 << (i % 8)); owned */
	uint64_t nbits;
	uint64_t count; /* bits set, kept up to date by set/clear */
};

/* Allocates nbits clear bits (at most BITMAP_MAX_BITS). Returns 0, -EINVAL or -ENOMEM. */
#define BITMAP_MAX_BITS (1ull << 48)
int bitmap_init(struct bitmap *b, uint64_t nbits) __attribute__((warn_unused_result));
void bitmap_destroy(struct bitmap *b);
/* Bytes needed to store nbits. */
static inline uint64_t bitmap_bytes(uint64_t nbits)
{
	return (nbits + 7) / 8;
}
bool bitmap_get(const struct bitmap *b, uint64_t i);
/* Set / clear bit i; returns its previous value. */
bool bitmap_set(struct bitmap *b, uint64_t i);
bool bitmap_clear(struct bitmap *b, uint64_t i);
/* First clear (set) bit at index >= from, or -1 when none. */
int64_t bitmap_next_clear(const struct bitmap *b, uint64_t from);
int64_t bitmap_next_set(const struct bitmap *b, uint64_t from);
/*
 * Replaces the bits with a stored copy of bitmap_bytes(nbits) bytes;
 * padding bits past nbits must be zero (-EBADMSG otherwise).  Recounts.
 */
int bitmap_load(struct bitmap *b, const uint8_t *bytes, size_t len)
	__attribute__((warn_unused_result));

/* --- meta.c: the metadata file --- */

/*
 * NAME.meta layout, all integers little-endian:
 *   [0, 4096)      header slot 0
 *   [4096, 8192)   header slot 1
 *   [8192, ...)    present-bitmap, bitmap_bytes(chunks) bytes
 *   then, with META_FLAG_WRITTEN, the written-bitmap, as many bytes
 * The slot with the higher generation and a valid checksum wins, so a
 * header update (written to the other slot) is atomic even if torn.
 *
 * Header slot:
 *   0  char[8] magic "STRMFSMD"
 *   8  u32 version (META_VERSION)
 *   12 u32 header length in bytes (64 + strings)
 *   16 u64 generation
 *   24 u64 size in bytes
 *   32 u32 chunk size in bytes
 *   36 u32 flags (META_FLAG_*)
 *   40 u64 speed limit in bytes/s
 *   48 u16 url length, 50 u16 etag length, 52 u16 last-modified length,
 *   54 u16 manifest-url length
 *   56 u32 CRC-32C of the header length bytes with this field zero
 *   60 u32 reserved (zero)
 *   64 url, etag, last-modified, manifest-url, no terminators
 */
#define META_MAGIC "STRMFSMD"
#define META_VERSION 1u
#define META_SLOT_SIZE 4096u
#define META_BITMAP_OFFSET (2u * META_SLOT_SIZE)
#define META_FIXED_SIZE 64u
#define META_URL_MAX 2048u
#define META_ETAG_MAX 512u
#define META_LASTMOD_MAX 128u
#define META_MANIFEST_MAX 1024u

#define META_FLAG_COMPLETE 0x1u
#define META_FLAG_MANIFEST 0x2u /* NAME.manifest holds per-chunk hashes */
#define META_FLAG_STALE 0x4u    /* the template changed: the disk fails until
				 * `start` finds the one it was added from */
#define META_FLAG_WRITTEN 0x8u  /* the written-bitmap follows the present-bitmap:
				 * chunks changed through the mount (verify skips them) */
#define META_FLAGS_KNOWN                                                                    \
	(META_FLAG_COMPLETE | META_FLAG_MANIFEST | META_FLAG_STALE | META_FLAG_WRITTEN)

/*
 * NAME.manifest, the disk's copy of its manifest, all little-endian:
 *   0  char[8] magic "STRMFSMH"
 *   8  u32 version (1)
 *   12 u32 chunk size
 *   16 u64 size
 *   24 u64 chunks
 *   32 u32 CRC-32C of bytes 0..31
 *   36..63 zero
 *   64 chunks * 32 bytes: SHA-256 per chunk, all-zero for a zero chunk
 */
#define MANIFEST_FILE_MAGIC "STRMFSMH"
#define MANIFEST_FILE_HEADER 64u

struct meta {
	uint32_t version;
	uint64_t generation;
	uint64_t size;       /* bytes, > 0 */
	uint32_t chunk_size; /* bytes, power of two in [64 KiB, 16 MiB] */
	uint32_t flags;
	uint64_t speed;      /* bytes/s, 0 = none */
	char *url;           /* owned, never NULL after decode */
	char *etag;          /* owned, "" when none */
	char *last_modified; /* owned, "" when none */
	char *manifest_url;  /* owned, "" when none */
};

/* Frees the strings; m may then be reused. */
void meta_clear(struct meta *m);

static inline uint64_t meta_chunks(const struct meta *m)
{
	return m->size / m->chunk_size + (m->size % m->chunk_size != 0);
}

/* Bytes of NAME.meta for m: the header slots and the bitmaps its flags say. */
uint64_t meta_file_size(const struct meta *m);

/*
 * Encodes m into one slot (out has META_SLOT_SIZE bytes; unused bytes are
 * zeroed).  Returns 0, -EINVAL (bad sizes, NULL url) or -ENAMETOOLONG.
 */
int meta_encode(const struct meta *m, uint8_t *out) __attribute__((warn_unused_result));

/*
 * Decodes one slot of len bytes.  Returns 0 and fills *ret (caller clears
 * it), -EBADMSG (bad magic, checksum, lengths or fields) or
 * -EPROTONOSUPPORT (sealed by a newer streamfs: a version or flags this
 * build does not know).
 */
int meta_decode(const uint8_t *in, size_t len, struct meta *ret)
	__attribute__((warn_unused_result));

/* CRC-32C (Castagnoli) of len bytes. */
uint32_t meta_crc32c(const void *data, size_t len);

/*
 * Loads the newest valid header from fd and the bitmap into b (initialised
 * here).  Returns 0, -EBADMSG (no valid slot, truncated file),
 * -EPROTONOSUPPORT, or a syscall's -errno; why receives a reason.
 */
int meta_load(int fd, struct meta *ret, struct bitmap *b, char *why, size_t why_size)
	__attribute__((warn_unused_result));

/*
 * Loads the written-bitmap of the disk m describes into w (initialised
 * here; all clear when m lacks META_FLAG_WRITTEN).  Returns as meta_load.
 */
int meta_load_written(int fd, const struct meta *m, struct bitmap *w, char *why,
		      size_t why_size) __attribute__((warn_unused_result));

/*
 * Writes m, with its generation increased, into the slot not holding the
 * current header, then fdatasyncs fd.  Updates m->generation on success.
 */
int meta_store_header(int fd, struct meta *m) __attribute__((warn_unused_result));

#endif
