/* TCP echo on port 7, one connection at a time (RFC 793, minus options).
 *
 * SYN → SYN-ACK; each in-order data segment is acknowledged by the segment
 * echoing it back; FIN → FIN-ACK, and the connection is closed once the
 * peer acknowledges our FIN. Echoed bytes stay in a ring buffer until
 * acknowledged and are retransmitted (go-back-N, doubling timeout) when the
 * peer does not acknowledge them; the window we advertise is the free room
 * in that buffer, so the peer cannot outrun it. No options are sent, so the
 * peer's MSS towards us is the default 536; options received are skipped.
 * Segments for other ports, or for no connection, get an RST; a second
 * client is refused while the first one is active.
 */
#include "tcpecho.h"

#define PORT 7
#define TXBUF 4096              /* power of two */
#define SEG 536                 /* default IPv4 MSS */
#define RTO_MS 1000
#define RTO_MAX_MS 8000
#define MAX_RETRIES 8
#define IDLE_MS 10000           /* a new client may replace an idle one */
#define LOUD_CONNS 10           /* connections reported on serial */

#define FIN 0x01
#define SYN 0x02
#define RST 0x04
#define PSH 0x08
#define ACK 0x10

enum { LISTEN, SYN_RCVD, ESTABLISHED, LAST_ACK };

static struct net *nic;
static u8 my_ip[4];
static u8 out[14 + 20 + 20 + SEG];
static u8 seg[SEG];
static u8 txbuf[TXBUF];         /* byte with sequence s: (s - iss - 1) mod TXBUF */
static unsigned conns;

static struct {
	int state;
	int loud;
	u8 mac[6], ip[4];
	u16 port;
	u32 iss, snd_una, snd_nxt, rcv_nxt;
	u16 wnd_sent;
	u32 rto;
	int retries;
	u64 rto_at;             /* 0: no retransmission pending */
	u64 last_seen;
} c;

static int before(u32 a, u32 b) { return (int)(a - b) < 0; }

void tcp_echo_init(struct net *n, const u8 ip[4])
{
	nic = n;
	memcpy(my_ip, ip, 4);
	c.state = LISTEN;
}

static void send_seg(const u8 mac[6], const u8 ip[4], u16 sport, u16 dport, u32 seq, u32 ack,
		     u8 flags, u16 wnd, const u8 *data, u32 dlen)
{
	u8 *tcp = out + 34;
	ipv4_header(out, mac, nic->mac, my_ip, ip, 6, 20 + dlen);
	put_be16(tcp, sport);
	put_be16(tcp + 2, dport);
	put_be32(tcp + 4, seq);
	put_be32(tcp + 8, ack);
	tcp[12] = 5 << 4;               /* data offset: no options */
	tcp[13] = flags;
	put_be16(tcp + 14, wnd);
	put_be16(tcp + 16, 0);          /* checksum, below */
	put_be16(tcp + 18, 0);          /* urgent pointer */
	memcpy(tcp + 20, data, dlen);
	put_be16(tcp + 16, l4_csum(out + 14, 6, tcp, 20 + dlen));
	net_send(nic, out, 34 + 20 + dlen);
}

/* The RST answering a segment that belongs to no connection (RFC 793). */
static void reset_for(const u8 *f, const struct ipv4_pkt *p, u32 seg_len)
{
	const u8 *tcp = p->l4;
	u8 flags = tcp[13];
	if (flags & RST)
		return;
	if (flags & ACK)
		send_seg(f + 6, p->ip + 12, be16(tcp + 2), be16(tcp), be32(tcp + 8), 0, RST, 0, 0, 0);
	else
		send_seg(f + 6, p->ip + 12, be16(tcp + 2), be16(tcp), 0, be32(tcp + 4) + seg_len,
			 RST | ACK, 0, 0, 0);
}

/* Sequence number after the last echoed byte (our FIN follows it). */
static u32 data_end(void)
{
	return c.state == LAST_ACK ? c.snd_nxt - 1 : c.snd_nxt;
}

static u32 unacked(void)
{
	u32 end = data_end();
	if (c.state == SYN_RCVD || !before(c.snd_una, end))
		return 0;
	return end - c.snd_una;
}

static void conn_send(u32 seq, u8 flags, const u8 *data, u32 dlen)
{
	c.wnd_sent = (u16)(TXBUF - unacked());
	send_seg(c.mac, c.ip, PORT, c.port, seq, c.rcv_nxt, flags | ACK, c.wnd_sent, data, dlen);
}

/* Sends buffered bytes [from, to) in segments of at most SEG bytes. */
static void send_data(u32 from, u32 to)
{
	while (before(from, to)) {
		u32 n = to - from, i;
		if (n > SEG)
			n = SEG;
		for (i = 0; i < n; i++)
			seg[i] = txbuf[(from + i - c.iss - 1) & (TXBUF - 1)];
		conn_send(from, PSH, seg, n);
		from += n;
	}
}

static void arm_timer(void)
{
	if (!c.rto_at) {
		c.rto = RTO_MS;
		c.rto_at = clock_ms() + c.rto;
	}
}

static void close_conn(const char *why)
{
	if (c.loud) {
		puts("tcp: ");
		puts(why);
		puts("\n");
	}
	c.state = LISTEN;
	c.rto_at = 0;
}

static void accept_conn(const u8 *f, const struct ipv4_pkt *p, u32 seq)
{
	u64 t = rdtsc();
	c.state = SYN_RCVD;
	memcpy(c.mac, f + 6, 6);
	memcpy(c.ip, p->ip + 12, 4);
	c.port = be16(p->l4);
	c.iss = (u32)(t >> 4) * 2654435761u ^ (u32)(t >> 36);
	c.snd_una = c.iss;
	c.snd_nxt = c.iss + 1;
	c.rcv_nxt = seq + 1;
	c.retries = 0;
	c.rto_at = 0;
	c.last_seen = clock_ms();
	c.loud = ++conns <= LOUD_CONNS;
	if (c.loud) {
		puts("tcp: connection from ");
		put_ip(c.ip);
		puts(" port ");
		put_dec(c.port);
		puts("\n");
	}
	conn_send(c.iss, SYN, 0, 0);
	arm_timer();
}

/* In-order data and FIN of an established connection. */
static void receive(const u8 *data, u32 dlen, u32 seq, u8 flags)
{
	u32 take, start;
	if (before(seq, c.rcv_nxt)) {   /* starts with bytes we have already */
		u32 old = c.rcv_nxt - seq;
		if (old > dlen)
			old = dlen;
		data += old;
		dlen -= old;
		seq += old;
	}
	if (seq != c.rcv_nxt) {         /* a hole before it, or stale */
		conn_send(c.snd_nxt, 0, 0, 0);
		return;
	}
	take = TXBUF - unacked();
	if (take > dlen)
		take = dlen;
	if (take) {
		u32 i;
		start = c.snd_nxt;
		for (i = 0; i < take; i++)
			txbuf[(start + i - c.iss - 1) & (TXBUF - 1)] = data[i];
		c.rcv_nxt += take;
		c.snd_nxt += take;
		send_data(start, c.snd_nxt);  /* acknowledges and echoes */
		arm_timer();
	}
	if ((flags & FIN) && take == dlen) {
		c.rcv_nxt++;
		c.snd_nxt++;
		c.state = LAST_ACK;
		conn_send(c.snd_nxt - 1, FIN, 0, 0);
		arm_timer();
	} else if (!take) {
		conn_send(c.snd_nxt, 0, 0, 0);  /* duplicate or no room */
	}
}

void tcp_echo_input(const u8 *f, const struct ipv4_pkt *p)
{
	const u8 *tcp = p->l4;
	u32 doff, dlen, seq, ack, seg_len;
	u16 sport;
	u8 flags;
	if (p->l4_len < 20)
		return;
	doff = (u32)(tcp[12] >> 4) * 4;
	if (doff < 20 || doff > p->l4_len || l4_csum(p->ip, 6, tcp, p->l4_len) != 0)
		return;
	flags = tcp[13];
	sport = be16(tcp);
	seq = be32(tcp + 4);
	ack = be32(tcp + 8);
	dlen = p->l4_len - doff;
	seg_len = dlen + !!(flags & SYN) + !!(flags & FIN);
	if (!sport)
		return;
	if (be16(tcp + 2) != PORT) {
		reset_for(f, p, seg_len);
		return;
	}
	if (c.state == LISTEN || c.port != sport || memcmp(c.ip, p->ip + 12, 4)) {
		if ((flags & (SYN | ACK | RST | FIN)) != SYN) {
			reset_for(f, p, seg_len);
			return;
		}
		if (c.state != LISTEN) {
			if (clock_ms() - c.last_seen < IDLE_MS) {
				reset_for(f, p, seg_len);   /* busy: refused */
				return;
			}
			send_seg(c.mac, c.ip, PORT, c.port, c.snd_nxt, 0, RST, 0, 0, 0);
			close_conn("idle connection dropped for a new one");
		}
		accept_conn(f, p, seq);
		return;
	}
	c.last_seen = clock_ms();
	if (flags & RST) {
		/* Only inside the window, so a blind RST cannot end it. */
		if ((u32)(seq - c.rcv_nxt) < TXBUF)
			close_conn("reset by the peer");
		return;
	}
	if (flags & SYN) {
		if (c.state == SYN_RCVD && seq == c.rcv_nxt - 1)
			conn_send(c.iss, SYN, 0, 0);     /* our SYN-ACK was lost */
		else
			conn_send(c.snd_nxt, 0, 0, 0);   /* challenge ACK (RFC 5961) */
		return;
	}
	if (!(flags & ACK))
		return;
	if (before(c.snd_nxt, ack)) {           /* acknowledges the future */
		if (c.state == SYN_RCVD)
			reset_for(f, p, seg_len);
		else
			conn_send(c.snd_nxt, 0, 0, 0);
		return;
	}
	if (c.state == SYN_RCVD) {
		if (ack != c.snd_nxt) {
			reset_for(f, p, seg_len);
			return;
		}
		c.state = ESTABLISHED;
	}
	if (before(c.snd_una, ack)) {
		u16 wnd_was = c.wnd_sent;
		c.snd_una = ack;
		c.retries = 0;
		c.rto_at = 0;
		if (c.snd_una != c.snd_nxt)
			arm_timer();
		if (c.state == LAST_ACK && ack == c.snd_nxt) {
			close_conn("closed");
			return;
		}
		if (wnd_was < SEG && !dlen && !(flags & FIN))
			conn_send(c.snd_nxt, 0, 0, 0);  /* the window opened again */
	}
	if (c.state == LAST_ACK) {
		if (flags & FIN)
			conn_send(c.snd_nxt - 1, FIN, 0, 0);  /* our FIN-ACK was lost */
		else if (dlen)
			conn_send(c.snd_nxt, 0, 0, 0);
		return;
	}
	if (dlen || (flags & FIN))
		receive(tcp + doff, dlen, seq, flags);
}

void tcp_echo_timer(u64 now_ms)
{
	if (c.state == LISTEN || !c.rto_at || now_ms < c.rto_at)
		return;
	if (++c.retries > MAX_RETRIES) {
		send_seg(c.mac, c.ip, PORT, c.port, c.snd_nxt, 0, RST, 0, 0, 0);
		close_conn("no acknowledgement, connection dropped");
		return;
	}
	if (c.state == SYN_RCVD) {
		conn_send(c.iss, SYN, 0, 0);
	} else {
		send_data(c.snd_una, data_end());
		if (c.state == LAST_ACK)
			conn_send(c.snd_nxt - 1, FIN, 0, 0);
	}
	c.rto = c.rto * 2 > RTO_MAX_MS ? RTO_MAX_MS : c.rto * 2;
	c.rto_at = now_ms + c.rto;
}
