/* SPDX-License-Identifier: MIT */
/*
 * Hooks into one range transfer: set by the cache for each fill, carried
 * unchanged through fs/ (struct cache_fetch_hint) to fetch/ (struct
 * fetch_req), and called by the transfer as it goes.  Any may be NULL.
 */
#ifndef STREAMFS_XFER_H
#define STREAMFS_XFER_H

#include <stdbool.h>
#include <stddef.h>

struct xfer_hooks {
	/* Set for background fills: called between pieces of the body; it
	 * may sleep to hold the transfer back (the socket is not read
	 * meanwhile, so TCP slows the sender) while a demand request of any
	 * disk is under way (see cache/stream.c). */
	void (*hold)(void *opaque);
	void *hold_opaque;
	/* Called with +1 once the transfer has a connection and is about to
	 * start, and with -1 when it has ended (once per attempt).  Demand
	 * fills count their requests on the wire with it: background fills
	 * hold back only for those, never for one queued for a connection
	 * that a held-back transfer would free.  Background fills time each
	 * attempt's pace with it (for preempt). */
	void (*on_wire)(void *opaque, int delta);
	void *on_wire_opaque;
	/* Called as the body arrives with how many bytes at the start of
	 * the buffer are in, once the reply's status, Content-Range, size and
	 * validator were found right; those bytes are the template's even if
	 * the transfer fails later.  A retry starts again from 0.  Set for a
	 * demand fill that may answer its reader early, and for a background
	 * fill, which stores each chunk once it is in (it may block in
	 * pwrite and hold back).  HTTP only: file:// reports no progress. */
	void (*progress)(void *opaque, size_t got);
	void *progress_opaque;
	/* Set for background fills: polled as the transfer goes (at least
	 * once a second); true ends it at once with -EINTR, which is neither
	 * retried nor counted as an error.  A demand read waiting for one of
	 * its chunks so need not wait for a slow transfer to end (see
	 * fill_preempted in cache/disk.c).  HTTP only. */
	bool (*preempt)(void *opaque);
	void *preempt_opaque;
};

#endif
