// SPDX-License-Identifier: MIT
/*
 * relay: a delaying TCP relay that stands in for a WAN link in benchmarks,
 * because the kernels we bench on have no netem qdisc.  It accepts on a
 * loopback address, opens one upstream connection per accepted client and
 * relays both directions.  Every byte read from one side is held for
 * --delay-ms before it is written to the other, so a round trip gains twice
 * the delay.  Each direction also has a --window byte budget, like a TCP
 * window: a byte is charged when it is read and credited back one delay
 * after it was delivered (when its ACK would arrive on a real link), so a
 * single connection tops out near window / (2 * delay).  Memory is bounded
 * by two windows per live connection.  --rate adds a bottleneck link that
 * the upstream->client directions of all connections share: each takes
 * turns of RELAY_QUANTUM bytes on it, so busy connections split it fairly
 * and one that wakes up waits behind a quantum of each, not behind their
 * windows (a fair-queueing router, not a FIFO).
 *
 * Threading: the main thread owns the listening socket and a signalfd.
 * Each connection has two threads, one per direction.  A direction's queue
 * belongs to its thread alone, so the data path takes no locks; the two
 * threads of a connection share only an abort flag and an eventfd that
 * wakes them.  relay->lock guards the connection list used at shutdown;
 * relay->link_lock the link's clock (--rate).
 *
 * Standalone on purpose: builds with
 *   cc -O2 -Wall -Wextra -pthread -o relay bench/relay.c
 * and needs nothing beyond libc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define RELAY_READ_MAX (256u * 1024)	/* bytes per recv(2) */
#define RELAY_SEG_MAX 8192u		/* queued segments per direction */
#define RELAY_STACK (256u * 1024)	/* bytes of stack per relay thread */
#define RELAY_BACKLOG 512
#define RELAY_QUANTUM (16u * 1024)	/* --rate: bytes per turn on the link */
#define NSEC_PER_MSEC 1000000ull
#define NSEC_PER_SEC 1000000000ull

#define _wur_ __attribute__((warn_unused_result))

struct relay_opts {
	struct sockaddr_in listen_addr;
	struct sockaddr_in connect_addr;
	uint64_t delay_ns;	/* one-way hold time per byte */
	size_t window;		/* bytes in flight per direction, >= 1 */
	uint64_t rate;		/* upstream->client bytes/s over all conns, 0: none */
	const char *port_file;	/* NULL: don't write one */
	bool stats;
};

/* One recv(2)'s worth of bytes, released as a unit. */
struct seg {
	uint64_t due_ns;	/* CLOCK_MONOTONIC time the bytes may be sent */
	uint64_t sent_ns;	/* when its last byte was sent (--rate only) */
	uint64_t end;		/* stream offset one past the segment's end */
};

/*
 * One direction of a connection.  Stream offsets only grow:
 * ack <= wr <= rd and rd - ack <= window.  Bytes [wr, rd) wait in buf at
 * offset % window; [ack, wr) are delivered but not yet credited back.
 */
struct dir {
	struct conn *conn;
	int src, dst;		/* borrowed from conn */
	unsigned char *buf;	/* ring of window bytes */
	struct seg *segs;	/* ring of RELAY_SEG_MAX */
	size_t seg_head;	/* ring index of the oldest uncredited segment */
	size_t seg_n;		/* segments held, sent or not */
	size_t seg_sent;	/* the first seg_sent of them are fully sent */
	uint64_t rd, wr, ack;	/* stream offsets, see above */
	uint64_t eof_due_ns;	/* when src's EOF may be passed on */
	bool eof;		/* src returned EOF */
	bool can_read;		/* src not known to be drained (no EAGAIN yet) */
	bool can_write;		/* dst not known to be full */
	int err;		/* first fatal -errno of this direction, 0 if none */
	/* --rate, upstream->client only: the turn on the shared link this
	 * direction holds, for bytes [wr, grant_end), from grant_ns on. */
	bool limited;
	uint64_t grant_ns, grant_end;
};

struct conn {
	struct relay *relay;
	unsigned long id;
	int client_fd;
	int upstream_fd;
	int wake_fd;		/* eventfd; becomes readable on abort */
	atomic_bool abort;	/* set once; both direction threads exit */
	struct dir c2u, u2c;
	uint64_t start_ns;
	struct conn *prev, *next;	/* guarded by relay->lock */
};

struct relay {
	const struct relay_opts *opts;
	pthread_mutex_t lock;	/* protects: conns, nconns; leaf lock */
	pthread_cond_t idle;	/* signalled when nconns drops */
	struct conn *conns;	/* guarded by lock */
	size_t nconns;		/* guarded by lock */
	unsigned long next_id;	/* main thread only */
	pthread_mutex_t link_lock; /* protects: link_free_ns; leaf lock */
	uint64_t link_free_ns;	/* --rate: when the shared link is next free */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	/* CLOCK_MONOTONIC cannot fail with a valid pointer. */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}

static size_t min_size(size_t a, size_t b)
{
	return a < b ? a : b;
}

/*
 * --rate: takes a turn of q bytes on the link that every connection's
 * upstream->client direction shares, and returns when it starts.  Each
 * direction takes at most one quantum ahead, so backlogged connections
 * take turns and a newly busy one waits behind one quantum of each: fair
 * queueing at the bottleneck, as fq_codel does, not one shared FIFO.
 */
static uint64_t link_take(struct relay *rl, uint64_t now, size_t q)
{
	uint64_t start;

	pthread_mutex_lock(&rl->link_lock);
	start = rl->link_free_ns > now ? rl->link_free_ns : now;
	rl->link_free_ns = start + (uint64_t)q * NSEC_PER_SEC / rl->opts->rate;
	pthread_mutex_unlock(&rl->link_lock);
	return start;
}

/* The i-th held segment, oldest first. */
static struct seg *dir_seg(struct dir *d, size_t i)
{
	assert(i < d->seg_n);
	return &d->segs[(d->seg_head + i) % RELAY_SEG_MAX];
}

static void conn_abort(struct conn *c)
{
	uint64_t one = 1;

	atomic_store(&c->abort, true);
	/*
	 * The eventfd is only ever written, so the counter cannot overflow
	 * in practice; EAGAIN would mean it is already readable, which is
	 * all we need.
	 */
	ssize_t n = write(c->wake_fd, &one, sizeof(one));

	assert(n == (ssize_t)sizeof(one) || errno == EAGAIN);
	(void)n;
}

/* Credits back the window of segments delivered at least a delay ago. */
static void dir_credit(struct dir *d, uint64_t now)
{
	uint64_t delay = d->conn->relay->opts->delay_ns;

	while (d->seg_sent > 0) {
		struct seg *s = dir_seg(d, 0);

		/* Behind a rate-limited link a segment leaves later than it
		 * was due: its ACK comes a delay after it left. */
		if ((d->limited ? s->sent_ns : s->due_ns) + delay > now)
			break;
		d->ack = s->end;
		d->seg_head = (d->seg_head + 1) % RELAY_SEG_MAX;
		d->seg_n--;
		d->seg_sent--;
	}
}

static bool dir_has_room(const struct dir *d)
{
	return d->rd - d->ack < d->conn->relay->opts->window &&
	       d->seg_n < RELAY_SEG_MAX;
}

/* Stream offset up to which bytes are due at @now (d->wr if none). */
static uint64_t dir_due_end(struct dir *d, uint64_t now)
{
	uint64_t end = d->wr;

	for (size_t i = d->seg_sent; i < d->seg_n; i++) {
		const struct seg *s = dir_seg(d, i);

		if (s->due_ns > now)
			break;
		end = s->end;
	}
	return end;
}

/*
 * Writes the bytes that are due.  Returns 1 if some were written, 0 if
 * none (nothing due, or dst full: can_write is then cleared), or -errno.
 */
static _wur_ int dir_send(struct dir *d, uint64_t now)
{
	size_t cap = d->conn->relay->opts->window;
	uint64_t end = dir_due_end(d, now);
	size_t off = (size_t)(d->wr % cap);
	size_t len = (size_t)(end - d->wr);
	struct iovec iov[2];
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 1 };
	ssize_t n;

	if (len == 0)
		return 0;
	if (d->limited) {
		if (d->grant_end <= d->wr) {
			size_t q = min_size(len, RELAY_QUANTUM);

			d->grant_ns = link_take(d->conn->relay, now, q);
			d->grant_end = d->wr + q;
		}
		if (d->grant_ns > now)
			return 0; /* dir_deadline() wakes us for our turn */
		len = min_size(len, (size_t)(d->grant_end - d->wr));
	}
	iov[0].iov_base = d->buf + off;
	iov[0].iov_len = min_size(len, cap - off);
	if (len > iov[0].iov_len) {
		iov[1].iov_base = d->buf;
		iov[1].iov_len = len - iov[0].iov_len;
		mh.msg_iovlen = 2;
	}
	n = sendmsg(d->dst, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			d->can_write = false;
			return 0;
		}
		if (errno == EINTR)
			return 0;
		return -errno;
	}
	d->wr += (uint64_t)n;
	while (d->seg_sent < d->seg_n && dir_seg(d, d->seg_sent)->end <= d->wr)
		dir_seg(d, d->seg_sent++)->sent_ns = now;
	return 1;
}

/*
 * Reads what the window allows into the ring and queues it as one
 * segment due a delay from now.  Returns 1 on data or EOF, 0 if nothing
 * could be read (no room, or src drained: can_read is then cleared), or
 * -errno.
 */
static _wur_ int dir_recv(struct dir *d, uint64_t now)
{
	const struct relay_opts *o = d->conn->relay->opts;
	size_t cap = o->window;
	size_t off = (size_t)(d->rd % cap);
	size_t len;
	struct seg *s;
	ssize_t n;

	if (!dir_has_room(d))
		return 0;
	len = min_size(RELAY_READ_MAX, cap - (size_t)(d->rd - d->ack));
	len = min_size(len, cap - off);
	n = recv(d->src, d->buf + off, len, MSG_DONTWAIT);
	if (n < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			d->can_read = false;
			return 0;
		}
		if (errno == EINTR)
			return 0;
		return -errno;
	}
	if (n == 0) {
		d->eof = true;
		d->eof_due_ns = now + o->delay_ns;
		return 1;
	}
	d->rd += (uint64_t)n;
	d->seg_n++;
	s = dir_seg(d, d->seg_n - 1);
	s->due_ns = now + o->delay_ns;
	s->end = d->rd;
	return 1;
}

/*
 * Earliest future time at which a timer (not fd readiness) lets this
 * direction progress, or UINT64_MAX.  Bytes already due wait for dst's
 * POLLOUT, not for a timer (a deadline in the past would spin the thread
 * for as long as the receiver does not read), or for their turn on the
 * link (--rate).
 */
static uint64_t dir_deadline(struct dir *d, uint64_t now)
{
	uint64_t t = UINT64_MAX;

	if (d->seg_sent < d->seg_n) {
		uint64_t due = dir_seg(d, d->seg_sent)->due_ns;

		if (due > now)
			t = due;
		else if (d->can_write) /* due, yet unsent: waits for its turn */
			t = d->limited ? d->grant_ns : now;
	}
	if (!d->eof && !dir_has_room(d) && d->seg_sent > 0) {
		const struct seg *s = dir_seg(d, 0);
		uint64_t credit = (d->limited ? s->sent_ns : s->due_ns) +
				  d->conn->relay->opts->delay_ns;

		if (credit < t)
			t = credit;
	}
	if (d->eof && d->wr == d->rd && d->eof_due_ns < t)
		t = d->eof_due_ns;
	return t;
}

/*
 * Relays src to dst until src's EOF has been passed on (0), the
 * connection is aborted (-ECANCELED), or an I/O error (-errno).  Called
 * on the direction's own thread; touches only its own struct dir.
 */
static _wur_ int dir_run(struct dir *d)
{
	struct conn *c = d->conn;

	for (;;) {
		struct pollfd pfd[3];
		int ipoll_src = -1, ipoll_dst = -1;
		nfds_t nfds = 0;
		bool progress = false;
		uint64_t now, deadline;
		struct timespec ts, *tsp = NULL;
		int r;

		if (atomic_load(&c->abort))
			return -ECANCELED;
		now = now_ns();
		dir_credit(d, now);
		if (d->can_write) {
			r = dir_send(d, now);
			if (r < 0)
				return r;
			progress |= r > 0;
		}
		if (d->eof && d->wr == d->rd && now >= d->eof_due_ns) {
			if (shutdown(d->dst, SHUT_WR) < 0 && errno != ENOTCONN)
				return -errno;
			return 0;
		}
		if (!d->eof && d->can_read) {
			r = dir_recv(d, now);
			if (r < 0)
				return r;
			progress |= r > 0;
		}
		if (progress)
			continue;

		pfd[nfds++] = (struct pollfd){ .fd = c->wake_fd, .events = POLLIN };
		if (!d->eof && !d->can_read && dir_has_room(d)) {
			ipoll_src = (int)nfds;
			pfd[nfds++] = (struct pollfd){ .fd = d->src, .events = POLLIN };
		}
		if (!d->can_write && dir_due_end(d, now) > d->wr) {
			ipoll_dst = (int)nfds;
			pfd[nfds++] = (struct pollfd){ .fd = d->dst, .events = POLLOUT };
		}
		deadline = dir_deadline(d, now);
		if (deadline != UINT64_MAX) {
			uint64_t wait = deadline > now ? deadline - now : 0;

			ts.tv_sec = (time_t)(wait / NSEC_PER_SEC);
			ts.tv_nsec = (long)(wait % NSEC_PER_SEC);
			tsp = &ts;
		}
		r = ppoll(pfd, nfds, tsp, NULL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (ipoll_src >= 0 && pfd[ipoll_src].revents)
			d->can_read = true;
		if (ipoll_dst >= 0 && pfd[ipoll_dst].revents)
			d->can_write = true;
	}
}

/* Runs one direction; on failure the whole connection is torn down. */
static void dir_work(struct dir *d)
{
	int r = dir_run(d);

	if (r < 0 && r != -ECANCELED) {
		d->err = r;
		conn_abort(d->conn);
	}
}

static void *dir_thread(void *arg)
{
	dir_work(arg);
	return NULL;
}

/* Sets up an idle direction of c; its fds are filled in once connected. */
static _wur_ int dir_init(struct dir *d, struct conn *c)
{
	d->conn = c;
	d->src = -1;
	d->dst = -1;
	d->can_read = true;
	d->can_write = true;
	/*
	 * mmap rather than malloc: pages an idle or slow connection never
	 * touches stay unbacked, and munmap hands them back at close.
	 */
	d->buf = mmap(NULL, c->relay->opts->window, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (d->buf == MAP_FAILED) {
		d->buf = NULL;
		return -ENOMEM;
	}
	d->segs = calloc(RELAY_SEG_MAX, sizeof(*d->segs));
	if (!d->segs)
		return -ENOMEM;
	return 0;
}

/* Frees what dir_init() allocated; safe on a partly set up direction. */
static void dir_fini(struct dir *d)
{
	if (d->buf)
		munmap(d->buf, d->conn->relay->opts->window);
	free(d->segs);
}

static _wur_ int socket_tune(int fd)
{
	int one = 1;

	/* Nagle would add its own latency on top of the emulated one. */
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		return -errno;
	return 0;
}

/* Makes the next close(2) send a RST, so a reset reaches the other peer. */
static void socket_set_reset(int fd)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };

	/* Best effort: without it the peer sees a FIN instead of a RST. */
	(void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

static _wur_ int conn_connect_upstream(struct conn *c)
{
	int fd, r;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* Loopback only: connect(2) completes or fails at once. */
	if (connect(fd, (const struct sockaddr *)&c->relay->opts->connect_addr,
		    sizeof(c->relay->opts->connect_addr)) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	r = socket_tune(fd);
	if (r < 0) {
		close(fd);
		return r;
	}
	c->upstream_fd = fd;
	return 0;
}

static void conn_free(struct conn *c)
{
	if (!c)
		return;
	if (c->client_fd >= 0)
		close(c->client_fd);
	if (c->upstream_fd >= 0)
		close(c->upstream_fd);
	if (c->wake_fd >= 0)
		close(c->wake_fd);
	dir_fini(&c->c2u);
	dir_fini(&c->u2c);
	free(c);
}

static void conn_report(struct conn *c, int err)
{
	double secs = (double)(now_ns() - c->start_ns) / (double)NSEC_PER_SEC;
	char why[128] = "";

	if (!c->relay->opts->stats && (err == 0 || err == -ECANCELED))
		return;
	if (err == -ECANCELED)
		snprintf(why, sizeof(why), ", aborted");
	else if (err < 0)
		snprintf(why, sizeof(why), ", reset: %s", strerror(-err));
	fprintf(stderr,
		"relay: conn %lu closed after %.3f s: client->upstream %" PRIu64
		" bytes, upstream->client %" PRIu64 " bytes%s\n",
		c->id, secs, c->c2u.wr, c->u2c.wr, why);
}

/*
 * Unlinks c from the relay and frees it; the last thing c's own thread
 * does.  nconns drops only once c is gone, so that relay_stop() returning
 * means no connection still touches memory.
 */
static void conn_release(struct conn *c)
{
	struct relay *rl = c->relay;

	pthread_mutex_lock(&rl->lock);
	if (c->prev)
		c->prev->next = c->next;
	else
		rl->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	pthread_mutex_unlock(&rl->lock);
	conn_free(c);

	pthread_mutex_lock(&rl->lock);
	rl->nconns--;
	pthread_cond_broadcast(&rl->idle);
	pthread_mutex_unlock(&rl->lock);
}

static _wur_ int thread_attr_init(pthread_attr_t *attr, bool detached)
{
	int r = pthread_attr_init(attr);

	if (r != 0)
		return -r;
	r = pthread_attr_setstacksize(attr, RELAY_STACK);
	if (r == 0 && detached)
		r = pthread_attr_setdetachstate(attr, PTHREAD_CREATE_DETACHED);
	if (r != 0) {
		pthread_attr_destroy(attr);
		return -r;
	}
	return 0;
}

/*
 * Connection thread: connects upstream, runs client->upstream itself and
 * upstream->client on a second thread, then tears the connection down.
 */
static void *conn_thread(void *arg)
{
	struct conn *c = arg;
	pthread_attr_t attr;
	pthread_t u2c;
	int err, r;

	err = conn_connect_upstream(c);
	if (err < 0) {
		fprintf(stderr, "relay: cannot connect conn %lu upstream: %s\n",
			c->id, strerror(-err));
		goto out;
	}
	if (fcntl(c->client_fd, F_SETFL, O_NONBLOCK) < 0 ||
	    fcntl(c->upstream_fd, F_SETFL, O_NONBLOCK) < 0) {
		err = -errno;
		goto out;
	}
	c->c2u.src = c->u2c.dst = c->client_fd;
	c->c2u.dst = c->u2c.src = c->upstream_fd;

	err = thread_attr_init(&attr, false);
	if (err < 0)
		goto out;
	r = pthread_create(&u2c, &attr, dir_thread, &c->u2c);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		err = -r;
		goto out;
	}
	dir_work(&c->c2u);
	r = pthread_join(u2c, NULL);
	assert(r == 0);
	err = c->c2u.err ? c->c2u.err : c->u2c.err;
	if (err == 0 && atomic_load(&c->abort))
		err = -ECANCELED;
out:
	if (err < 0) {
		socket_set_reset(c->client_fd);
		if (c->upstream_fd >= 0)
			socket_set_reset(c->upstream_fd);
	}
	conn_report(c, err);
	conn_release(c);
	return NULL;
}

/*
 * Takes ownership of client_fd and starts its connection thread.
 * Main thread only.
 */
static _wur_ int relay_conn_start(struct relay *rl, int client_fd)
{
	struct conn *c;
	pthread_attr_t attr;
	pthread_t thread;
	int r;

	c = calloc(1, sizeof(*c));
	if (!c) {
		close(client_fd);
		return -ENOMEM;
	}
	c->relay = rl;
	c->id = ++rl->next_id;
	c->client_fd = client_fd;
	c->upstream_fd = -1;
	c->start_ns = now_ns();
	c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->wake_fd < 0) {
		r = -errno;
		conn_free(c);
		return r;
	}
	r = socket_tune(client_fd);
	if (r == 0)
		r = dir_init(&c->c2u, c);
	if (r == 0)
		r = dir_init(&c->u2c, c);
	c->u2c.limited = rl->opts->rate > 0;
	if (r == 0)
		r = thread_attr_init(&attr, true);
	if (r < 0) {
		conn_free(c);
		return r;
	}

	pthread_mutex_lock(&rl->lock);
	c->next = rl->conns;
	if (c->next)
		c->next->prev = c;
	rl->conns = c;
	rl->nconns++;
	pthread_mutex_unlock(&rl->lock);

	r = pthread_create(&thread, &attr, conn_thread, c);
	pthread_attr_destroy(&attr);
	if (r != 0) {
		/* conn_release() also frees c. */
		conn_release(c);
		return -r;
	}
	return 0;
}

/* Aborts every connection and waits for their threads to finish. */
static void relay_stop(struct relay *rl)
{
	pthread_mutex_lock(&rl->lock);
	for (struct conn *c = rl->conns; c; c = c->next)
		conn_abort(c);
	while (rl->nconns > 0)
		pthread_cond_wait(&rl->idle, &rl->lock);
	pthread_mutex_unlock(&rl->lock);
}

static _wur_ int parse_addr(const char *s, struct sockaddr_in *ret)
{
	const char *colon = strrchr(s, ':');
	char host[INET_ADDRSTRLEN];
	struct sockaddr_in sa = { .sin_family = AF_INET };
	unsigned long port;
	char *end;

	if (!colon || (size_t)(colon - s) >= sizeof(host))
		return -EINVAL;
	memcpy(host, s, (size_t)(colon - s));
	host[colon - s] = '\0';
	if (strcmp(host, "localhost") == 0)
		snprintf(host, sizeof(host), "127.0.0.1");
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		return -EINVAL;
	/* Stay on loopback: this tool must never expose or reach the network. */
	if ((ntohl(sa.sin_addr.s_addr) >> 24) != 127)
		return -EADDRNOTAVAIL;
	errno = 0;
	port = strtoul(colon + 1, &end, 10);
	if (errno || end == colon + 1 || *end || port > 65535)
		return -EINVAL;
	sa.sin_port = htons((uint16_t)port);
	*ret = sa;
	return 0;
}

/* Parses "BYTES[k|m|g]" (binary units). */
static _wur_ int parse_size(const char *s, size_t *ret)
{
	unsigned long long v, mult = 1;
	char *end;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		return -EINVAL;
	switch (*end) {
	case '\0':
		break;
	case 'k': case 'K':
		mult = 1ull << 10;
		break;
	case 'm': case 'M':
		mult = 1ull << 20;
		break;
	case 'g': case 'G':
		mult = 1ull << 30;
		break;
	default:
		return -EINVAL;
	}
	if (*end && end[1] && strcasecmp(end + 1, "iB") != 0)
		return -EINVAL;
	if (v == 0 || v > SIZE_MAX / mult)
		return -ERANGE;
	*ret = (size_t)(v * mult);
	return 0;
}

static _wur_ int parse_delay(const char *s, uint64_t *ret)
{
	double ms;
	char *end;

	errno = 0;
	ms = strtod(s, &end);
	if (errno || end == s || *end || !(ms >= 0) || ms > 600000)
		return -EINVAL;
	*ret = (uint64_t)(ms * (double)NSEC_PER_MSEC + 0.5);
	return 0;
}

/* Writes "PORT\n" to path via a temporary file and rename(2). */
static _wur_ int write_port_file(const char *path, unsigned port)
{
	char *tmp = NULL;
	char line[16];
	int fd, len, r = 0;

	if (asprintf(&tmp, "%s.tmp.%ld", path, (long)getpid()) < 0)
		return -ENOMEM;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	len = snprintf(line, sizeof(line), "%u\n", port);
	if (write(fd, line, (size_t)len) != len)
		r = errno ? -errno : -EIO;
	if (close(fd) < 0 && r == 0)
		r = -errno;
	if (r == 0 && rename(tmp, path) < 0)
		r = -errno;
	if (r < 0)
		unlink(tmp);
out:
	free(tmp);
	return r;
}

static _wur_ int listen_open(const struct sockaddr_in *addr, unsigned *ret_port)
{
	struct sockaddr_in bound;
	socklen_t blen = sizeof(bound);
	int one = 1, fd, r;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0 ||
	    listen(fd, RELAY_BACKLOG) < 0 ||
	    getsockname(fd, (struct sockaddr *)&bound, &blen) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	*ret_port = ntohs(bound.sin_port);
	return fd;
}

/* Accepts until SIGINT/SIGTERM arrives on sig_fd.  Main thread only. */
static _wur_ int relay_serve(struct relay *rl, int listen_fd, int sig_fd)
{
	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = listen_fd, .events = POLLIN },
			{ .fd = sig_fd, .events = POLLIN },
		};
		int fd, r;

		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (pfd[1].revents) {
			struct signalfd_siginfo si;

			if (read(sig_fd, &si, sizeof(si)) == sizeof(si) &&
			    rl->opts->stats)
				fprintf(stderr, "relay: caught signal %u, stopping\n",
					si.ssi_signo);
			return 0;
		}
		if (!pfd[0].revents)
			continue;
		fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			switch (errno) {
			case EAGAIN:
			case EINTR:
			case ECONNABORTED:
			case EPROTO:
				continue;
			case EMFILE:
			case ENFILE:
			case ENOBUFS:
			case ENOMEM:
				fprintf(stderr, "relay: cannot accept: %s\n",
					strerror(errno));
				/* Give live connections a chance to free fds. */
				poll(NULL, 0, 100);
				continue;
			default:
				return -errno;
			}
		}
		r = relay_conn_start(rl, fd);
		if (r < 0)
			fprintf(stderr, "relay: cannot start connection: %s\n",
				strerror(-r));
	}
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: relay --listen <addr>:<port> --connect <addr>:<port>\n"
		"             [--delay-ms <ms>] [--window <bytes>[k|m|g]]\n"
		"             [--rate <bytes/s>[k|m|g]]\n"
		"             [--port-file <file>] [--stats]\n"
		"\n"
		"Delaying TCP relay for benchmarks (loopback addresses only).\n"
		"  --listen     address to accept on; port 0 picks a free one\n"
		"  --connect    upstream to open for each accepted connection\n"
		"  --delay-ms   one-way delay per byte, each direction (default 10)\n"
		"  --window     bytes in flight per direction (default 6m)\n"
		"  --rate       upstream->client bytes/s, one link shared by every\n"
		"               connection in fair turns (default: no limit)\n"
		"  --port-file  write the listening port here once listening\n"
		"  --stats      print per-connection byte counts at close\n");
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "connect", required_argument, NULL, 'c' },
		{ "delay-ms", required_argument, NULL, 'd' },
		{ "window", required_argument, NULL, 'w' },
		{ "rate", required_argument, NULL, 'r' },
		{ "port-file", required_argument, NULL, 'p' },
		{ "stats", no_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	/* Static: detached threads may outlive main()'s frame by a hair. */
	static struct relay_opts o = {
		.delay_ns = 10 * NSEC_PER_MSEC,
		.window = 6u << 20,
	};
	static struct relay rl = {
		.opts = &o,
		.lock = PTHREAD_MUTEX_INITIALIZER,
		.idle = PTHREAD_COND_INITIALIZER,
		.link_lock = PTHREAD_MUTEX_INITIALIZER,
	};
	bool have_listen = false, have_connect = false;
	unsigned port = 0;
	sigset_t sigs;
	int opt, r, listen_fd, sig_fd;

	while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'l':
			r = parse_addr(optarg, &o.listen_addr);
			have_listen = r == 0;
			break;
		case 'c':
			r = parse_addr(optarg, &o.connect_addr);
			have_connect = r == 0;
			break;
		case 'd':
			r = parse_delay(optarg, &o.delay_ns);
			break;
		case 'w':
			r = parse_size(optarg, &o.window);
			break;
		case 'r': {
			size_t rate;

			r = parse_size(optarg, &rate);
			o.rate = rate;
			break;
		}
		case 'p':
			o.port_file = optarg;
			r = 0;
			break;
		case 's':
			o.stats = true;
			r = 0;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
		if (r < 0) {
			fprintf(stderr, "relay: invalid option value '%s': %s\n",
				optarg, strerror(-r));
			return 2;
		}
	}
	if (optind != argc || !have_listen || !have_connect) {
		usage(stderr);
		return 2;
	}

	/* Block before any thread exists so that every thread inherits it. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	r = pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	if (r != 0) {
		fprintf(stderr, "relay: cannot block signals: %s\n", strerror(r));
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	sig_fd = signalfd(-1, &sigs, SFD_CLOEXEC);
	if (sig_fd < 0) {
		fprintf(stderr, "relay: cannot create signalfd: %s\n",
			strerror(errno));
		return 1;
	}

	listen_fd = listen_open(&o.listen_addr, &port);
	if (listen_fd < 0) {
		fprintf(stderr, "relay: cannot listen: %s\n", strerror(-listen_fd));
		return 1;
	}
	if (o.port_file) {
		r = write_port_file(o.port_file, port);
		if (r < 0) {
			fprintf(stderr, "relay: cannot write port file %s: %s\n",
				o.port_file, strerror(-r));
			return 1;
		}
	}
	if (o.stats)
		fprintf(stderr,
			"relay: listening on port %u, delay %.3f ms, window %zu bytes, "
			"rate %" PRIu64 " bytes/s\n",
			port, (double)o.delay_ns / (double)NSEC_PER_MSEC, o.window, o.rate);

	r = relay_serve(&rl, listen_fd, sig_fd);
	close(listen_fd);
	relay_stop(&rl);
	close(sig_fd);
	if (r < 0) {
		fprintf(stderr, "relay: cannot accept: %s\n", strerror(-r));
		return 1;
	}
	return 0;
}
