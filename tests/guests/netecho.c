/* netecho: frames both ways through virtio-net. Answers ARP for 10.0.2.15
 * and echoes UDP datagrams sent to 10.0.2.15:7 as "echo: <payload>", with
 * IP and UDP checksums computed here (the host drops the reply if they are
 * wrong) and the host's checksums verified. Powers off after echoing "quit".
 */
#include "guest.h"
#include "net.h"

static const u8 my_ip[4] = { 10, 0, 2, 15 };
static u8 out[1514];

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
	if (udp_len < 8 || 34u + udp_len > len || udp_len > 1400)
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

void guest_main(struct hvm_start_info *si)
{
	struct net n;
	u8 arp[42];
	(void)si;
	if (!net_init(&n))
		fail("no NIC");
	puts("netecho: NIC up\n");
	for (;;) {
		u8 *f;
		u32 len = net_recv(&n, &f);
		if (net_is_arp_request(f, len, my_ip)) {
			net_build_arp_reply(&n, f, my_ip, arp);
			net_recv_done(&n);
			net_send(&n, arp, sizeof(arp));
			puts("netecho: ARP reply sent\n");
			continue;
		}
		/* IPv4, UDP, to us, port 7. */
		if (len >= 42 && f[12] == 0x08 && f[13] == 0x00 && f[23] == 17 &&
		    !memcmp(f + 30, my_ip, 4) && be16(f + 36) == 7) {
			int quit = echo(&n, f, len);
			net_recv_done(&n);
			if (quit)
				break;
			continue;
		}
		net_recv_done(&n);
	}
	puts("netecho: done\n");
}
