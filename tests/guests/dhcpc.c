/* A minimal DHCP client (RFC 2131, options from RFC 2132) over the polling
 * virtio-net driver. Messages go out broadcast from 0.0.0.0:68 with the
 * BOOTP broadcast flag set, so the server broadcasts its replies too; a
 * reply is taken when its UDP and IPv4 headers are consistent with the
 * frame, it is for port 68, and op, xid, chaddr and magic cookie match. */
#include "dhcpc.h"

#define RETRY_MS 2000           /* retransmission interval */
#define GIVE_UP_MS 120000       /* no lease after this: fail the guest */
#define REQUEST_TRIES 4         /* unanswered REQUESTs before starting over */
#define MAX_RESTARTS 3          /* NAKs or unanswered REQUESTs */

#define DHCPDISCOVER 1
#define DHCPOFFER 2
#define DHCPREQUEST 3
#define DHCPACK 5
#define DHCPNAK 6

/* BOOTP fixed part: offsets in the message. */
#define B_OP 0
#define B_HTYPE 1
#define B_HLEN 2
#define B_XID 4
#define B_SECS 8
#define B_FLAGS 10
#define B_YIADDR 16
#define B_CHADDR 28
#define B_COOKIE 236
#define B_OPTIONS 240
#define BOOTP_MIN 300           /* what BOOTP relays and servers expect */

static const u8 cookie[4] = { 99, 130, 83, 99 };
static const u8 ip_zero[4], ip_broadcast[4] = { 255, 255, 255, 255 };
static const u8 param_list[] = { 1, 3, 6, 12, 15, 26, 51, 54 };
static u8 out[14 + 20 + 8 + 576];

/* One received reply: its type, yiaddr and options. */
struct dhcp_msg {
	u8 type;
	u8 has_server;
	struct dhcp_lease l;    /* l.ip: yiaddr; l.server: option 54 */
};

static u32 new_xid(const struct net *n)
{
	u64 t = rdtsc();
	u32 x = (u32)t ^ (u32)(t >> 32) ^ be32(n->mac + 2);
	return x * 2654435761u ^ (u32)(t >> 7);
}

static u8 *opt(u8 *o, u8 code, u8 len, const u8 *v)
{
	o[0] = code;
	o[1] = len;
	memcpy(o + 2, v, len);
	return o + 2 + len;
}

/* Broadcasts a DISCOVER (req and server null) or a REQUEST for req from
 * server, as in the SELECTING state: ciaddr 0, options 50 and 54. */
static void send_msg(struct net *n, u8 type, u32 xid, u16 secs, const u8 *req, const u8 *server)
{
	u8 *udp = out + 34, *d = udp + 8, *o;
	u8 client_id[7], max_size[2];
	u32 len;
	u16 c;
	memset(out, 0, sizeof(out));
	d[B_OP] = 1;                        /* BOOTREQUEST */
	d[B_HTYPE] = 1;                     /* Ethernet */
	d[B_HLEN] = 6;
	put_be32(d + B_XID, xid);
	put_be16(d + B_SECS, secs);
	put_be16(d + B_FLAGS, 0x8000);      /* broadcast replies: no address yet */
	memcpy(d + B_CHADDR, n->mac, 6);
	memcpy(d + B_COOKIE, cookie, 4);
	o = opt(d + B_OPTIONS, 53, 1, &type);
	client_id[0] = 1;                   /* hardware type, then the MAC */
	memcpy(client_id + 1, n->mac, 6);
	o = opt(o, 61, sizeof(client_id), client_id);
	put_be16(max_size, 1500);          /* what fits our receive buffer */
	o = opt(o, 57, 2, max_size);
	if (req)
		o = opt(o, 50, 4, req);
	if (server)
		o = opt(o, 54, 4, server);
	o = opt(o, 55, sizeof(param_list), param_list);
	*o++ = 255;                         /* end; zeros (pad) follow */
	len = (u32)(o - d);
	if (len < BOOTP_MIN)
		len = BOOTP_MIN;
	ipv4_header(out, mac_broadcast, n->mac, ip_zero, ip_broadcast, 17, 8 + len);
	put_be16(udp, 68);
	put_be16(udp + 2, 67);
	put_be16(udp + 4, (u16)(8 + len));
	c = l4_csum(out + 14, 17, udp, 8 + len);
	put_be16(udp + 6, c ? c : 0xffff);
	net_send(n, out, 34 + 8 + len);
}

/* Copies a host name, printable characters only (the bound line is split
 * on spaces). */
static void copy_name(char *dst, const u8 *v, u32 len)
{
	u32 i;
	if (len > 63)
		len = 63;
	for (i = 0; i < len; i++)
		dst[i] = v[i] > ' ' && v[i] < 127 ? (char)v[i] : '?';
	dst[len] = 0;
}

/* Walks the options of d (dlen bytes, fixed part checked); every option's
 * length is checked against the end. Returns 0 on a malformed walk. */
static int parse_options(const u8 *d, u32 dlen, struct dhcp_msg *m)
{
	u32 i = B_OPTIONS, olen;
	const u8 *v;
	while (i < dlen) {
		u8 code = d[i];
		if (code == 0) {                /* pad */
			i++;
			continue;
		}
		if (code == 255)                /* end */
			break;
		if (dlen - i < 2)
			return 0;
		olen = d[i + 1];
		if (olen > dlen - i - 2)
			return 0;
		v = d + i + 2;
		switch (code) {
		case 53:
			if (olen == 1)
				m->type = v[0];
			break;
		case 1:
			if (olen == 4) {
				memcpy(m->l.mask, v, 4);
				m->l.has_mask = 1;
			}
			break;
		case 3:                         /* routers: the first one */
			if (olen >= 4) {
				memcpy(m->l.router, v, 4);
				m->l.has_router = 1;
			}
			break;
		case 6:                         /* DNS servers: the first one */
			if (olen >= 4) {
				memcpy(m->l.dns, v, 4);
				m->l.has_dns = 1;
			}
			break;
		case 12:
			copy_name(m->l.hostname, v, olen);
			break;
		case 26:
			if (olen == 2 && be16(v) >= 68) {
				m->l.mtu = be16(v);
				m->l.has_mtu = 1;
			}
			break;
		case 51:
			if (olen == 4) {
				m->l.lease = be32(v);
				m->l.has_lease = 1;
			}
			break;
		case 54:
			if (olen == 4) {
				memcpy(m->l.server, v, 4);
				m->has_server = 1;
			}
			break;
		}
		i += 2 + olen;
	}
	return 1;
}

/* Returns 1 when frame f is a well-formed reply to transaction xid. */
static int parse_reply(const struct net *n, const u8 *f, u32 len, u32 xid, struct dhcp_msg *m)
{
	struct ipv4_pkt p;
	const u8 *udp, *d;
	u32 ulen, dlen;
	if (len < 14 || (memcmp(f, n->mac, 6) && memcmp(f, mac_broadcast, 6)))
		return 0;
	if (!ipv4_parse(f, len, &p) || p.proto != 17 || p.l4_len < 8)
		return 0;
	udp = p.l4;
	ulen = be16(udp + 4);
	if (ulen < 8 || ulen > p.l4_len || be16(udp) != 67 || be16(udp + 2) != 68)
		return 0;
	if (be16(udp + 6) && l4_csum(p.ip, 17, udp, ulen) != 0)
		return 0;
	d = udp + 8;
	dlen = ulen - 8;
	if (dlen < B_OPTIONS || d[B_OP] != 2 || d[B_HTYPE] != 1 || d[B_HLEN] != 6)
		return 0;
	if (be32(d + B_XID) != xid || memcmp(d + B_CHADDR, n->mac, 6) ||
	    memcmp(d + B_COOKIE, cookie, 4))
		return 0;
	memset(m, 0, sizeof(*m));
	memcpy(m->l.ip, d + B_YIADDR, 4);
	return parse_options(d, dlen, m) && m->type;
}

void dhcp_bind(struct net *n, struct dhcp_lease *l)
{
	u64 start = clock_ms(), next;
	struct dhcp_msg m;
	u8 offered[4], server[4];
	int requesting, tries, restarts = 0;
	u32 xid, len;
	u8 *f;
restart:
	xid = new_xid(n);
	requesting = 0;
	tries = 0;
	next = 0;
	for (;;) {
		u64 now = clock_ms();
		if (now - start > GIVE_UP_MS)
			fail("dhcp: no lease after 120 s");
		if (now >= next) {
			u64 secs = (now - start) / 1000;
			if (requesting && tries == REQUEST_TRIES) {
				puts("dhcp: no ACK, starting over\n");
				if (++restarts > MAX_RESTARTS)
					fail("dhcp: no lease after 3 restarts");
				goto restart;
			}
			if (secs > 0xffff)
				secs = 0xffff;
			if (requesting)
				send_msg(n, DHCPREQUEST, xid, (u16)secs, offered, server);
			else
				send_msg(n, DHCPDISCOVER, xid, (u16)secs, 0, 0);
			tries++;
			next = now + RETRY_MS;
		}
		if (!net_poll(n, &f, &len)) {
			cpu_relax();
			continue;
		}
		if (!parse_reply(n, f, len, xid, &m)) {
			net_recv_done(n);
			continue;
		}
		net_recv_done(n);
		if (!requesting && m.type == DHCPOFFER && m.has_server &&
		    memcmp(m.l.ip, ip_zero, 4) && memcmp(m.l.ip, ip_broadcast, 4)) {
			memcpy(offered, m.l.ip, 4);
			memcpy(server, m.l.server, 4);
			puts("dhcp: offer ");
			put_ip(offered);
			puts(" from ");
			put_ip(server);
			puts("\n");
			requesting = 1;
			tries = 0;
			next = 0;               /* REQUEST at once */
			continue;
		}
		if (!requesting || (m.has_server && memcmp(m.l.server, server, 4)))
			continue;
		if (m.type == DHCPNAK) {
			puts("dhcp: NAK from ");
			put_ip(server);
			puts(", starting over\n");
			if (++restarts > MAX_RESTARTS)
				fail("dhcp: no lease after 3 restarts");
			goto restart;
		}
		if (m.type == DHCPACK && !memcmp(m.l.ip, offered, 4)) {
			*l = m.l;
			memcpy(l->server, server, 4);
			return;
		}
	}
}

static void put_opt_ip(int has, const u8 ip[4])
{
	if (has)
		put_ip(ip);
	else
		puts("none");
}

void dhcp_print(const struct dhcp_lease *l)
{
	puts("dhcp: bound ");
	put_ip(l->ip);
	puts(" mask ");
	put_opt_ip(l->has_mask, l->mask);
	puts(" router ");
	put_opt_ip(l->has_router, l->router);
	puts(" dns ");
	put_opt_ip(l->has_dns, l->dns);
	puts(" hostname ");
	puts(l->hostname[0] ? l->hostname : "none");
	puts(" lease ");
	if (l->has_lease)
		put_dec(l->lease);
	else
		puts("none");
	puts(" mtu ");
	if (l->has_mtu)
		put_dec(l->mtu);
	else
		puts("none");
	puts("\n");
}
