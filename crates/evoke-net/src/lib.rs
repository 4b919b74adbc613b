//! Pod network: bridge, veth, tap, IPAM, Services in nftables, cluster DNS.
