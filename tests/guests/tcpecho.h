/* A minimal TCP echo server on port 7: one connection at a time. */
#ifndef KUBEVMM_TCPECHO_H
#define KUBEVMM_TCPECHO_H
#include "net.h"

/* Serves on nic n at address ip. */
void tcp_echo_init(struct net *n, const u8 ip[4]);
/* Handles TCP packet p (addressed to us) from frame f. */
void tcp_echo_input(const u8 *f, const struct ipv4_pkt *p);
/* Retransmits what the peer left unacknowledged for too long. */
void tcp_echo_timer(u64 now_ms);
#endif
