/* A minimal DHCP client (RFC 2131): DISCOVER, OFFER, REQUEST, ACK. */
#ifndef KUBEVMM_DHCPC_H
#define KUBEVMM_DHCPC_H
#include "net.h"

/* The lease, as the server's ACK gave it. */
struct dhcp_lease {
	u8 ip[4];
	u8 server[4];
	u8 mask[4], router[4], dns[4];
	u8 has_mask, has_router, has_dns, has_mtu, has_lease;
	u16 mtu;
	u32 lease;
	char hostname[64];  /* empty when the server sent none */
};

/* Broadcasts DISCOVERs until an OFFER, REQUESTs it until an ACK (after a
 * NAK or unanswered REQUESTs it starts over, a few times at most) and
 * returns the lease; fails the guest when there is none. Retransmits every
 * two seconds of TSC time. */
void dhcp_bind(struct net *n, struct dhcp_lease *l);
/* Prints "dhcp: bound <ip> mask <mask> router <router> dns <dns> hostname
 * <name> lease <seconds> mtu <mtu>", "none" for what the ACK left out. */
void dhcp_print(const struct dhcp_lease *l);
#endif
