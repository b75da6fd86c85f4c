/* netecho: frames both ways through virtio-net. Answers ARP for 10.0.2.15
 * and echoes UDP datagrams sent to 10.0.2.15:7 as "echo: <payload>", with
 * IP and UDP checksums computed here (the host drops the reply if they are
 * wrong) and the host's checksums verified. Powers off after echoing "quit".
 * Command line (for the benchmarks, hack/bench-net.sh):
 *   swap    echo each datagram as it came, in place: swap the Ethernet and
 *           IP addresses and the UDP ports (both checksums stay right),
 *           and send the receive buffer itself; no serial output. The same
 *           few instructions whatever the size, so that the benchmarks
 *           measure the NIC path rather than this guest's byte loops
 *           (which software KVM runs very slowly)
 *   qemu    find the NIC where QEMU's microvm puts virtio-mmio
 */
#include "guest.h"
#include "net.h"

static const u8 my_ip[4] = { 10, 0, 2, 15 };
static u8 out[1514];
static int swap;
/* Longest UDP datagram whose echo ("echo: " prepended) fits in out. */
#define UDP_MAX (1514u - 34 - 6)

/* Handles one IPv4/UDP frame for us; returns 1 when it asked us to quit. */
static int echo(struct net *n, const u8 *f, u32 len)
{
	const u8 *ip = f + 14, *udp = f + 34;
	u16 udp_len, plen, c;
	const u8 *oip = out + 14;
	u8 *oudp = out + 34;
	u32 i;
	if (len < 42 || (ip[0] & 0x0f) != 5)
		return 0;
	if (csum_fold(csum_add(0, ip, 20)) != 0)
		fail("bad IP header checksum from the host");
	udp_len = be16(udp + 4);
	if (udp_len < 8 || 34u + udp_len > len || udp_len > UDP_MAX)
		fail("bad UDP length from the host");
	if (be16(udp + 6) && l4_csum(ip, 17, udp, udp_len) != 0)
		fail("bad UDP checksum from the host");
	plen = (u16)(udp_len - 8);
	puts("netecho: got \"");
	for (i = 0; i < plen; i++)
		putc((char)udp[8 + i]);
	puts("\"\n");

	/* Back to the sender, from the address it asked. */
	ipv4_header(out, f + 6, n->mac, my_ip, ip + 12, 17, 8u + 6 + plen);
	memcpy(oudp, udp + 2, 2);         /* source port: the one asked */
	memcpy(oudp + 2, udp, 2);         /* to the sender's port */
	put_be16(oudp + 4, (u16)(8 + 6 + plen));
	put_be16(oudp + 6, 0);
	memcpy(oudp + 8, "echo: ", 6);
	memcpy(oudp + 14, udp + 8, plen);
	c = l4_csum(oip, 17, oudp, 8u + 6 + plen);
	put_be16(oudp + 6, c ? c : 0xffff);
	net_send(n, out, 14u + 20 + 8 + 6 + plen);
	return plen == 4 && !memcmp(udp + 8, "quit", 4);
}

/* "swap": back to the sender as it came (IPv4 without options, UDP). */
static void echo_in_place(struct net *n, u8 *f, u32 len)
{
	u32 ip_len = be16(f + 16), t4;
	u16 t2;
	if ((f[14] & 0x0f) != 5 || ip_len < 28 || 14 + ip_len > len)
		return;
	/* Ethernet destination and source (4 + 2 bytes each). */
	t4 = *(u32_ua *)f; *(u32_ua *)f = *(u32_ua *)(f + 6); *(u32_ua *)(f + 6) = t4;
	t2 = *(u16_ua *)(f + 4); *(u16_ua *)(f + 4) = *(u16_ua *)(f + 10); *(u16_ua *)(f + 10) = t2;
	/* IP source and destination, UDP source and destination ports. */
	t4 = *(u32_ua *)(f + 26); *(u32_ua *)(f + 26) = *(u32_ua *)(f + 30); *(u32_ua *)(f + 30) = t4;
	t2 = *(u16_ua *)(f + 34); *(u16_ua *)(f + 34) = *(u16_ua *)(f + 36); *(u16_ua *)(f + 36) = t2;
	net_send_received(n, 14 + ip_len);
}

void guest_main(struct hvm_start_info *si)
{
	struct net n;
	u8 arp[42];
	swap = cmdline_has(si, "swap");
	if (!net_init_at(&n, cmdline_has(si, "qemu") ? virtio_find_qemu(1) : virtio_find(1)))
		fail("no NIC");
	puts("netecho: NIC up\n");
	for (;;) {
		u8 *f;
		u32 len = net_recv(&n, &f);
		/* IPv4, UDP, to us, port 7: first, it is the benchmarks' hot path. */
		if (len >= 42 && be16(f + 12) == 0x0800 && f[23] == 17 &&
		    *(const u32_ua *)(f + 30) == *(const u32_ua *)my_ip && be16(f + 36) == 7) {
			int quit = 0;
			if (swap)
				echo_in_place(&n, f, len);
			else
				quit = echo(&n, f, len);
			net_recv_done(&n);
			if (quit)
				break;
			continue;
		}
		if (net_is_arp_request(f, len, my_ip)) {
			net_build_arp_reply(&n, f, my_ip, arp);
			net_recv_done(&n);
			net_send(&n, arp, sizeof(arp));
			puts("netecho: ARP reply sent\n");
			continue;
		}
		net_recv_done(&n);
	}
	puts("netecho: done\n");
}
