// Package netguard decides which network addresses Bulkhead may connect to, so
// that a customer's webhook URL cannot reach the platform's own networks (SSRF).
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
)

// ErrBadURL is returned for a destination URL that is not an absolute http or
// https URL with a host, no user info and at most MaxURLLength bytes.
var ErrBadURL = errors.New("bad url")

// ErrBlockedAddress is returned for an address the policy refuses: loopback,
// private, link-local, multicast, unspecified, shared (CGNAT) or reserved,
// unless the policy's allow-list permits it.
var ErrBlockedAddress = errors.New("blocked address")

// MaxURLLength is the longest destination URL CheckURL accepts, in bytes.
const MaxURLLength = 2048

// Policy is an outbound address policy. The zero value refuses every
// non-public address and allows nothing extra, so a forgotten NewPolicy fails
// closed. A Policy is immutable and safe for concurrent use.
type Policy struct {
	allow []netip.Prefix
}

// NewPolicy returns a policy that refuses non-public addresses except those in
// allow, a list of CIDRs such as "127.0.0.0/8" or "::1/128" (for tests and
// on-premises deployments).
func NewPolicy(allow []string) (*Policy, error) {
	p := &Policy{allow: make([]netip.Prefix, 0, len(allow))}
	for _, s := range allow {
		pfx, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("new policy: %w", err)
		}
		// Addresses are unmapped before matching, so an IPv4-mapped allow
		// entry must be unmapped too or it would never match.
		if pfx.Addr().Is4In6() && pfx.Bits() >= 96 {
			pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
		}
		p.allow = append(p.allow, pfx.Masked())
	}
	return p, nil
}

// CheckIP returns an error wrapping ErrBlockedAddress when the policy refuses ip.
func (p *Policy) CheckIP(ip netip.Addr) error {
	if !ip.IsValid() {
		return fmt.Errorf("check ip: invalid address: %w", ErrBlockedAddress)
	}
	// Prefix.Contains never matches an address with a zone, and an
	// IPv4-mapped IPv6 address never matches an IPv4 prefix: normalise both
	// so that neither form slips past the checks below.
	ip = ip.WithZone("").Unmap()
	if p.allowed(ip) {
		return nil
	}
	if why := refusal(ip); why != "" {
		return fmt.Errorf("check ip %s (%s): %w", ip, why, ErrBlockedAddress)
	}
	// A NAT64 gateway translates 64:ff9b::a.b.c.d to a.b.c.d, so the embedded
	// IPv4 address is the one actually reached.
	if b := ip.As16(); ip.Is6() && b == nat64(b) {
		v4 := netip.AddrFrom4([4]byte(b[12:]))
		if err := p.CheckIP(v4); err != nil {
			return fmt.Errorf("check ip %s (nat64): %w", ip, err)
		}
	}
	return nil
}

func (p *Policy) allowed(ip netip.Addr) bool {
	if p == nil {
		return false
	}
	for _, pfx := range p.allow {
		if pfx.Contains(ip) {
			return true
		}
	}
	return false
}

// nat64 returns b with its last four bytes kept and the rest set to the
// well-known NAT64 prefix 64:ff9b::/96 (RFC 6052), so b == nat64(b) exactly
// when b is in that prefix.
func nat64(b [16]byte) [16]byte {
	var n [16]byte
	n[1], n[2], n[3] = 0x64, 0xff, 0x9b
	copy(n[12:], b[12:])
	return n
}

// refusal names why ip (unmapped, without zone) is not a public address, or
// returns "" when it is.
func refusal(ip netip.Addr) string {
	switch {
	case ip.IsUnspecified():
		return "unspecified"
	case ip.IsLoopback():
		return "loopback"
	case ip.IsPrivate():
		return "private"
	case ip.IsLinkLocalUnicast():
		return "link-local"
	case ip.IsMulticast():
		return "multicast"
	}
	if ip.Is4() {
		b := ip.As4()
		switch {
		case b[0] == 0:
			return "this network" // 0.0.0.0/8: Linux connects it to the local host.
		case b[0] == 100 && b[1]&0xc0 == 64:
			return "shared address space" // 100.64.0.0/10, CGNAT.
		case b[0] >= 240:
			return "reserved" // 240.0.0.0/4 and the broadcast address.
		}
		return ""
	}
	if b := ip.As16(); b[0] == 0xfe && b[1]&0xc0 == 0xc0 {
		return "site-local" // fec0::/10: deprecated, still routed privately on some networks.
	}
	return ""
}

// loopbackAllowed reports whether the allow-list lets connections reach the
// local host, which is what a name like "localhost" would resolve to.
func (p *Policy) loopbackAllowed() bool {
	return p.CheckIP(netip.AddrFrom4([4]byte{127, 0, 0, 1})) == nil ||
		p.CheckIP(netip.IPv6Loopback()) == nil
}

// CheckURL parses raw as a destination URL and returns it, or an error
// wrapping ErrBadURL or ErrBlockedAddress. It checks an IP literal host
// against the policy but does not resolve names: DNS answers can change
// between now and the connection, so they are checked when dialing (see
// Control). It refuses "localhost" and "*.localhost" unless loopback is
// allowed, because resolvers answer those locally.
func (p *Policy) CheckURL(raw string) (*url.URL, error) {
	if len(raw) > MaxURLLength {
		return nil, fmt.Errorf("check url: longer than %d bytes: %w", MaxURLLength, ErrBadURL)
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Error repeats the URL, which may hold a token: keep only the cause.
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return nil, fmt.Errorf("check url: %w: %w", ErrBadURL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("check url: scheme %q is not http or https: %w", u.Scheme, ErrBadURL)
	}
	if u.Opaque != "" || u.Host == "" {
		return nil, fmt.Errorf("check url: no host: %w", ErrBadURL)
	}
	if u.User != nil {
		return nil, fmt.Errorf("check url: user info not allowed: %w", ErrBadURL)
	}
	if err := checkPort(u.Port()); err != nil {
		return nil, err
	}
	host := u.Hostname()
	if host == "" {
		return nil, fmt.Errorf("check url: no host: %w", ErrBadURL)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if err := p.CheckIP(ip); err != nil {
			return nil, fmt.Errorf("check url: %w", err)
		}
		return u, nil
	}
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if numeric(name) {
		// "127.1", "2130706433" or "0x7f.1" are not valid netip literals, but
		// some resolvers (getaddrinfo) read them as IPv4 addresses.
		return nil, fmt.Errorf("check url: ambiguous numeric host %q: %w", host, ErrBadURL)
	}
	if (name == "localhost" || strings.HasSuffix(name, ".localhost")) && !p.loopbackAllowed() {
		return nil, fmt.Errorf("check url: host %q (loopback): %w", host, ErrBlockedAddress)
	}
	return u, nil
}

func checkPort(port string) error {
	if port == "" {
		return nil
	}
	// url.Parse has already checked that port is all digits.
	n := 0
	for _, c := range port {
		n = n*10 + int(c-'0')
		if n > 65535 {
			break
		}
	}
	if n < 1 || n > 65535 {
		return fmt.Errorf("check url: port %s out of range: %w", port, ErrBadURL)
	}
	return nil
}

// numeric reports whether the last label of name is all digits or hex
// ("0x..."): no real top-level domain is, but inet_aton-style parsers treat
// such names as IPv4 addresses.
func numeric(name string) bool {
	last := name[strings.LastIndexByte(name, '.')+1:]
	if strings.HasPrefix(last, "0x") {
		return true
	}
	if last == "" {
		return false
	}
	for _, c := range last {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// Control checks the address a socket is about to connect to; its signature
// is that of net.Dialer.Control. The dialer calls it once per resolved
// address, after DNS and before connect, so a name that resolves to a refused
// address is caught whatever the DNS answer was when the URL was checked.
// Only TCP is allowed.
func (p *Policy) Control(network, address string, _ syscall.RawConn) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return fmt.Errorf("network %s: %w", network, ErrBlockedAddress)
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("address %q: %w", address, ErrBlockedAddress)
	}
	return p.CheckIP(ap.Addr())
}

// DialContext returns a dial function for http.Transport.DialContext that
// dials like dialer (nil means a zero net.Dialer) and checks every resolved
// address with Control. Any Control or ControlContext already set on dialer
// still runs, after the check. Errors for refused addresses wrap
// ErrBlockedAddress.
func (p *Policy) DialContext(dialer *net.Dialer) func(ctx context.Context, network, address string) (net.Conn, error) {
	var d net.Dialer
	if dialer != nil {
		d = *dialer
	}
	prevCtx, prev := d.ControlContext, d.Control
	d.Control = nil // ControlContext takes precedence; keep one hook.
	d.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
		if err := p.Control(network, address, c); err != nil {
			return err
		}
		switch {
		case prevCtx != nil:
			return prevCtx(ctx, network, address, c)
		case prev != nil:
			return prev(network, address, c)
		}
		return nil
	}
	return d.DialContext
}
