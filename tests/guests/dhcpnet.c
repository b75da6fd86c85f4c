/* dhcpnet: a VM NIC on a masquerade bridge, as a small IPv4 host.
 *
 * Takes an address from the bridge's DHCP server and prints one line:
 *   dhcp: bound <ip> mask <mask> router <router> dns <dns|none>
 *         hostname <name|none> lease <seconds> mtu <mtu|none>
 * then serves: ARP for its address (replies to the frame's sender), ICMP
 * echo ("icmp: echo from <ip>", first 5 printed), UDP echo on port 7
 * ("echo: " + the datagram, back to the sender) and TCP echo on port 7 (one
 * connection at a time, tcpecho.c).
 *
 * Command line:
 *   ping=a.b.c.d  after binding, ARP-resolve the address (or the router when
 *                 it is off-link), send 3 echo requests and print
 *                 "ping: reply from <ip>" for each reply
 *   spoof=mac     then send the router's port 9 twenty UDP datagrams from a
 *   spoof=ip      forged MAC (02:00:00:00:00:66) or IP (ours + 1) and five
 *                 gratuitous ARPs claiming it ("spoof: sent 20 forged frames
 *                 (mac|ip)"), then three genuine ones ("spoof: sent 3
 *                 genuine frames")
 *   poweroff      power off after those steps instead of serving
 *   tsc_mhz=N     the TSC rate for timeouts (default 2500)
 * While serving it powers off when the ACPI power button is pressed.
 */
#include "guest.h"
#include "net.h"
#include "dhcpc.h"
#include "tcpecho.h"

#define LOUD 5                  /* ICMP and UDP echoes reported on serial */
#define ARP_TRIES 10
#define ARP_RETRY_MS 1000
#define PING_COUNT 3
#define PING_ID 0x6b76
#define PING_DATA 32
#define PING_WAIT_MS 3000
#define SPOOF_FORGED 20
#define SPOOF_GARP 5
#define SPOOF_GENUINE 3
#define SPOOF_GAP_MS 10
#define SPOOF_SPORT 40009
#define BUTTON_POLL_MS 100

static struct net nic;
static struct dhcp_lease lease;
static u8 out[NET_FRAME_MAX];
static const u8 mac_zero[6];
static unsigned icmp_answered, udp_answered;

/* What the foreground steps wait for, filled in while serving. */
static u8 arp_want[4], arp_mac[6];
static int arp_wanted, arp_got;
static u8 ping_peer[4];
static u16 ping_seq;
static int ping_wanted, ping_got;

/* No answers to broadcast or multicast senders, or to addresses no host
 * has: 0/8, loopback, multicast and above, our subnet's broadcast. */
static int bad_source(const u8 *f, const u8 ip[4])
{
	int i, bcast = lease.has_mask && be32(lease.mask) != 0xffffffffu;
	for (i = 0; i < 4 && bcast; i++)
		bcast = (ip[i] | lease.mask[i]) == 0xff;
	return (f[6] & 1) || ip[0] == 0 || ip[0] == 127 || ip[0] >= 224 || bcast;
}

static void on_arp(const u8 *f, u32 len)
{
	u8 reply[42];
	u16 op;
	if (!net_is_arp(f, len) || (f[6] & 1))
		return;
	op = be16(f + 20);
	/* A request from the address we resolve tells its MAC as well. */
	if (arp_wanted && (op == 1 || op == 2) && !memcmp(f + 28, arp_want, 4) && !(f[22] & 1)) {
		memcpy(arp_mac, f + 22, 6);
		arp_got = 1;
	}
	if (net_is_arp_request(f, len, lease.ip)) {
		net_build_arp_reply(&nic, f, lease.ip, reply);
		net_send(&nic, reply, sizeof(reply));
	}
}

static void on_icmp(const u8 *f, const struct ipv4_pkt *p)
{
	const u8 *icmp = p->l4, *src = p->ip + 12;
	u8 *o = out + 34;
	u32 n = p->l4_len;
	if (n < 8 || csum_fold(csum_add(0, icmp, n)) != 0)
		return;
	if (icmp[0] == 0 && icmp[1] == 0) {     /* echo reply */
		if (ping_wanted && !memcmp(src, ping_peer, 4) && be16(icmp + 4) == PING_ID &&
		    be16(icmp + 6) == ping_seq)
			ping_got = 1;
		return;
	}
	if (icmp[0] != 8 || icmp[1] != 0 || 34 + n > sizeof(out))
		return;
	ipv4_header(out, f + 6, nic.mac, lease.ip, src, 1, n);
	memcpy(o, icmp, n);                     /* identifier, sequence, data */
	o[0] = 0;                               /* echo reply */
	put_be16(o + 2, 0);
	put_be16(o + 2, csum_fold(csum_add(0, o, n)));
	net_send(&nic, out, 34 + n);
	if (++icmp_answered <= LOUD) {
		puts("icmp: echo from ");
		put_ip(src);
		puts("\n");
	}
}

/* Sends a UDP datagram (the checksum computed) with the given sources. */
static void send_udp(const u8 eth_dst[6], const u8 eth_src[6], const u8 src[4], u16 sport,
		     const u8 dst[4], u16 dport, const u8 *a, u32 alen, const u8 *b, u32 blen)
{
	u8 *udp = out + 34;
	u32 len = 8 + alen + blen;
	u16 c;
	ipv4_header(out, eth_dst, eth_src, src, dst, 17, len);
	put_be16(udp, sport);
	put_be16(udp + 2, dport);
	put_be16(udp + 4, (u16)len);
	put_be16(udp + 6, 0);
	memcpy(udp + 8, a, alen);
	memcpy(udp + 8 + alen, b, blen);
	c = l4_csum(out + 14, 17, udp, len);
	put_be16(udp + 6, c ? c : 0xffff);
	net_send(&nic, out, 34 + len);
}

static void on_udp(const u8 *f, const struct ipv4_pkt *p)
{
	const u8 *udp = p->l4;
	u32 ulen, plen;
	u16 sport;
	if (p->l4_len < 8)
		return;
	ulen = be16(udp + 4);
	sport = be16(udp);
	if (ulen < 8 || ulen > p->l4_len || be16(udp + 2) != 7 || !sport)
		return;
	if (be16(udp + 6) && l4_csum(p->ip, 17, udp, ulen) != 0)
		return;
	plen = ulen - 8;
	if (34 + 8 + 6 + plen > sizeof(out))
		return;
	send_udp(f + 6, nic.mac, lease.ip, 7, p->ip + 12, sport, (const u8 *)"echo: ", 6,
		 udp + 8, plen);
	if (++udp_answered <= LOUD) {
		puts("udp: echo to ");
		put_ip(p->ip + 12);
		puts(" port ");
		put_dec(sport);
		puts("\n");
	}
}

static void handle(const u8 *f, u32 len)
{
	struct ipv4_pkt p;
	if (len < 14)
		return;
	if (f[12] == 0x08 && f[13] == 0x06) {
		on_arp(f, len);
		return;
	}
	/* IPv4 unicast to us, by MAC and by address. */
	if (memcmp(f, nic.mac, 6) || !ipv4_parse(f, len, &p) || memcmp(p.ip + 16, lease.ip, 4) ||
	    bad_source(f, p.ip + 12))
		return;
	if (p.proto == 1)
		on_icmp(f, &p);
	else if (p.proto == 17)
		on_udp(f, &p);
	else if (p.proto == 6)
		tcp_echo_input(f, &p);
}

static void serve_once(void)
{
	static u64 button_checked;
	u64 now;
	u8 *f;
	u32 len;
	if (net_poll(&nic, &f, &len)) {
		handle(f, len);
		net_recv_done(&nic);
	} else {
		cpu_relax();
	}
	now = clock_ms();
	tcp_echo_timer(now);
	/* An I/O exit each time round would be slow: look every 100 ms. */
	if (now - button_checked >= BUTTON_POLL_MS) {
		button_checked = now;
		if (inw(PM1_STS) & (1 << 8)) {
			puts("dhcpnet: ACPI shutdown requested\n");
			guest_poweroff();
		}
	}
}

/* Serves until *flag is set (returns 1) or until deadline (returns 0). */
static int serve_until(u64 deadline, const int *flag)
{
	while (!*flag) {
		if (clock_ms() >= deadline)
			return 0;
		serve_once();
	}
	return 1;
}

static void serve_for(u64 ms)
{
	static const int never;
	serve_until(clock_ms() + ms, &never);
}

/* ARP-resolves ip, retrying; returns 0 when nobody answered. */
static int resolve(const u8 ip[4], u8 mac[6])
{
	u8 req[42];
	int i;
	memcpy(arp_want, ip, 4);
	arp_got = 0;
	arp_wanted = 1;
	for (i = 0; i < ARP_TRIES && !arp_got; i++) {
		net_build_arp(req, 1, mac_broadcast, nic.mac, nic.mac, lease.ip, mac_zero, ip);
		net_send(&nic, req, sizeof(req));
		serve_until(clock_ms() + ARP_RETRY_MS, &arp_got);
	}
	arp_wanted = 0;
	if (arp_got)
		memcpy(mac, arp_mac, 6);
	return arp_got;
}

/* The router for addresses off our subnet, else the address itself. */
static const u8 *next_hop(const u8 ip[4])
{
	int i;
	if (lease.has_mask && lease.has_router)
		for (i = 0; i < 4; i++)
			if ((ip[i] ^ lease.ip[i]) & lease.mask[i])
				return lease.router;
	return ip;
}

static void do_ping(const char *arg)
{
	u8 target[4], mac[6], *icmp = out + 34;
	const u8 *hop;
	int i, j, replies = 0;
	if (!ip_parse(arg, target)) {
		puts("ping: bad address ");
		puts(arg);
		puts("\n");
		return;
	}
	hop = next_hop(target);
	if (!resolve(hop, mac)) {
		puts("ping: no ARP reply from ");
		put_ip(hop);
		puts("\n");
		return;
	}
	memcpy(ping_peer, target, 4);
	for (i = 1; i <= PING_COUNT; i++) {
		ipv4_header(out, mac, nic.mac, lease.ip, target, 1, 8 + PING_DATA);
		icmp[0] = 8;                    /* echo request */
		icmp[1] = 0;
		put_be16(icmp + 2, 0);
		put_be16(icmp + 4, PING_ID);
		put_be16(icmp + 6, (u16)i);
		for (j = 0; j < PING_DATA; j++)
			icmp[8 + j] = (u8)('a' + j % 26);
		put_be16(icmp + 2, csum_fold(csum_add(0, icmp, 8 + PING_DATA)));
		ping_seq = (u16)i;
		ping_got = 0;
		ping_wanted = 1;
		net_send(&nic, out, 34 + 8 + PING_DATA);
		if (serve_until(clock_ms() + PING_WAIT_MS, &ping_got)) {
			replies++;
			puts("ping: reply from ");
			put_ip(target);
			puts("\n");
		} else {
			puts("ping: no reply from ");
			put_ip(target);
			puts(" for seq ");
			put_dec((u64)i);
			puts("\n");
		}
	}
	ping_wanted = 0;
	puts("ping: ");
	put_dec((u64)replies);
	puts(" of ");
	put_dec(PING_COUNT);
	puts(" replies\n");
}

static void spoof_udp(const u8 eth_dst[6], const u8 eth_src[6], const u8 src[4], const char *what,
		      int i)
{
	u8 num[2] = { (u8)('0' + i / 10), (u8)('0' + i % 10) };
	send_udp(eth_dst, eth_src, src, SPOOF_SPORT, lease.router, 9, (const u8 *)what,
		 (u32)strlen(what), num, 2);
	serve_for(SPOOF_GAP_MS);
}

static void do_spoof(const char *mode)
{
	static const u8 fake_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x66 };
	u8 router_mac[6], src_mac[6], src_ip[4], garp[42];
	int by_mac = !memcmp(mode, "mac", 4), by_ip = !memcmp(mode, "ip", 3), i;
	if (!by_mac && !by_ip) {
		puts("spoof: unknown mode ");
		puts(mode);
		puts("\n");
		return;
	}
	if (!lease.has_router) {
		puts("spoof: no router to send to\n");
		return;
	}
	if (!resolve(lease.router, router_mac)) {
		puts("spoof: no ARP reply from the router, sending to broadcast\n");
		memcpy(router_mac, mac_broadcast, 6);
	}
	memcpy(src_mac, nic.mac, 6);
	memcpy(src_ip, lease.ip, 4);
	if (by_mac)
		memcpy(src_mac, fake_mac, 6);
	else
		put_be32(src_ip, be32(lease.ip) + 1);
	for (i = 0; i < SPOOF_FORGED; i++)
		spoof_udp(router_mac, src_mac, src_ip, "forged ", i);
	for (i = 0; i < SPOOF_GARP; i++) {
		net_build_arp(garp, 1, mac_broadcast, src_mac, src_mac, src_ip, mac_zero, src_ip);
		net_send(&nic, garp, sizeof(garp));
		serve_for(SPOOF_GAP_MS);
	}
	puts("spoof: sent ");
	put_dec(SPOOF_FORGED);
	puts(" forged frames (");
	puts(by_mac ? "mac" : "ip");
	puts(")\n");
	for (i = 0; i < SPOOF_GENUINE; i++)
		spoof_udp(router_mac, nic.mac, lease.ip, "genuine ", i);
	puts("spoof: sent ");
	put_dec(SPOOF_GENUINE);
	puts(" genuine frames\n");
}

static u64 parse_dec(const char *s)
{
	u64 v = 0;
	for (; *s >= '0' && *s <= '9' && v < 1000000; s++)
		v = v * 10 + (u64)(*s - '0');
	return *s ? 0 : v;
}

void guest_main(struct hvm_start_info *si)
{
	char arg[32];
	if (cmdline_get(si, "tsc_mhz", arg, sizeof(arg)) > 0)
		clock_set_tsc_mhz(parse_dec(arg));
	if (!net_init(&nic))
		fail("no NIC");
	puts("dhcpnet: NIC up, MAC ");
	put_mac(nic.mac);
	puts("\n");
	outw(PM1_EN, 1 << 8);                   /* power button status */
	dhcp_bind(&nic, &lease);
	dhcp_print(&lease);
	tcp_echo_init(&nic, lease.ip);
	if (cmdline_get(si, "ping", arg, sizeof(arg)) >= 0)
		do_ping(arg);
	if (cmdline_get(si, "spoof", arg, sizeof(arg)) >= 0)
		do_spoof(arg);
	if (cmdline_has(si, "poweroff")) {
		puts("dhcpnet: powering off\n");
		guest_poweroff();
	}
	puts("dhcpnet: serving ARP, ICMP echo, and UDP and TCP echo on port 7\n");
	for (;;)
		serve_once();
}
