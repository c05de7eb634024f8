package netguard

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

func mustPolicy(t *testing.T, allow ...string) *Policy {
	t.Helper()
	p, err := NewPolicy(allow)
	if err != nil {
		t.Fatalf("NewPolicy(%q): %v", allow, err)
	}
	return p
}

func TestNewPolicyRejectsBadCIDR(t *testing.T) {
	for _, s := range []string{"127.0.0.1", "10.0.0.0/33", "nope"} {
		if _, err := NewPolicy([]string{s}); err == nil {
			t.Errorf("NewPolicy(%q): want error", s)
		}
	}
}

func TestCheckIP(t *testing.T) {
	tests := []struct {
		ip      string
		allow   []string
		blocked bool
	}{
		{ip: "8.8.8.8"},
		{ip: "1.1.1.1"},
		{ip: "2606:4700:4700::1111"},
		{ip: "100.63.255.255"},
		{ip: "100.128.0.0"},
		{ip: "172.32.0.1"},
		{ip: "64:ff9b::808:808"}, // NAT64 of 8.8.8.8
		{ip: "127.0.0.1", blocked: true},
		{ip: "127.255.255.254", blocked: true},
		{ip: "::1", blocked: true},
		{ip: "10.1.2.3", blocked: true},
		{ip: "172.16.0.1", blocked: true},
		{ip: "172.31.255.255", blocked: true},
		{ip: "192.168.1.1", blocked: true},
		{ip: "fc00::1", blocked: true},
		{ip: "fd12:3456::1", blocked: true},
		{ip: "169.254.169.254", blocked: true}, // cloud metadata
		{ip: "fe80::1", blocked: true},
		{ip: "fe80::1%eth0", blocked: true},
		{ip: "fec0::1", blocked: true},
		{ip: "0.0.0.0", blocked: true},
		{ip: "0.1.2.3", blocked: true},
		{ip: "::", blocked: true},
		{ip: "224.0.0.1", blocked: true},
		{ip: "239.255.255.250", blocked: true},
		{ip: "ff02::1", blocked: true},
		{ip: "100.64.0.1", blocked: true},
		{ip: "100.127.255.255", blocked: true},
		{ip: "255.255.255.255", blocked: true},
		{ip: "::ffff:127.0.0.1", blocked: true},
		{ip: "::ffff:10.0.0.1", blocked: true},
		{ip: "::ffff:169.254.169.254", blocked: true},
		{ip: "64:ff9b::7f00:1", blocked: true}, // NAT64 of 127.0.0.1
		{ip: "127.0.0.1", allow: []string{"127.0.0.0/8"}},
		{ip: "::ffff:127.0.0.1", allow: []string{"127.0.0.0/8"}},
		{ip: "127.0.0.1", allow: []string{"::ffff:127.0.0.0/104"}},
		{ip: "::1", allow: []string{"::1/128"}},
		{ip: "::1", allow: []string{"127.0.0.0/8"}, blocked: true},
		{ip: "10.0.0.1", allow: []string{"10.0.0.0/24"}},
		{ip: "10.0.1.1", allow: []string{"10.0.0.0/24"}, blocked: true},
	}
	for _, tt := range tests {
		t.Run(tt.ip+"/"+strings.Join(tt.allow, ","), func(t *testing.T) {
			err := mustPolicy(t, tt.allow...).CheckIP(netip.MustParseAddr(tt.ip))
			if got := errors.Is(err, ErrBlockedAddress); got != tt.blocked {
				t.Fatalf("CheckIP(%s) = %v, want blocked=%v", tt.ip, err, tt.blocked)
			}
			if !tt.blocked && err != nil {
				t.Fatalf("CheckIP(%s) = %v, want nil", tt.ip, err)
			}
		})
	}
}

func TestZeroPolicyFailsClosed(t *testing.T) {
	var p Policy
	if err := p.CheckIP(netip.MustParseAddr("10.0.0.1")); !errors.Is(err, ErrBlockedAddress) {
		t.Fatalf("zero Policy CheckIP(10.0.0.1) = %v, want ErrBlockedAddress", err)
	}
	if err := p.CheckIP(netip.Addr{}); !errors.Is(err, ErrBlockedAddress) {
		t.Fatalf("CheckIP(invalid) = %v, want ErrBlockedAddress", err)
	}
}

func TestCheckURL(t *testing.T) {
	tests := []struct {
		url   string
		allow []string
		want  error
	}{
		{url: "https://hooks.example.com/impressions"},
		{url: "http://hooks.example.com:8080/x?token=abc#frag"},
		{url: "HTTPS://Hooks.Example.COM/"},
		{url: "https://8.8.8.8/hook"},
		{url: "https://[2606:4700:4700::1111]:443/hook"},
		{url: "https://example.com./"},
		{url: "https://localhost.example.com/"},
		{url: "", want: ErrBadURL},
		{url: "/relative/path", want: ErrBadURL},
		{url: "hooks.example.com/x", want: ErrBadURL},
		{url: "ftp://example.com/", want: ErrBadURL},
		{url: "file:///etc/passwd", want: ErrBadURL},
		{url: "gopher://example.com/", want: ErrBadURL},
		{url: "http:example.com", want: ErrBadURL},
		{url: "https://", want: ErrBadURL},
		{url: "https:///path", want: ErrBadURL},
		{url: "https://:443/", want: ErrBadURL},
		{url: "https://user:pass@example.com/", want: ErrBadURL},
		{url: "https://user@example.com/", want: ErrBadURL},
		{url: "https://example.com:0/", want: ErrBadURL},
		{url: "https://example.com:65536/", want: ErrBadURL},
		{url: "https://example.com:99999999999999999999/", want: ErrBadURL},
		{url: "https://exa mple.com/", want: ErrBadURL},
		{url: "https://example.com/" + strings.Repeat("a", MaxURLLength), want: ErrBadURL},
		{url: "http://127.1/", want: ErrBadURL},
		{url: "http://2130706433/", want: ErrBadURL},
		{url: "http://0x7f000001/", want: ErrBadURL},
		{url: "http://0x7f.0.0.1/", want: ErrBadURL},
		{url: "http://127.0.0.1:8080/", want: ErrBlockedAddress},
		{url: "http://%31%32%37.0.0.1/", want: ErrBadURL}, // Go refuses escaped ASCII in hosts.
		{url: "http://[::1]/", want: ErrBlockedAddress},
		{url: "http://[::ffff:127.0.0.1]/", want: ErrBlockedAddress},
		{url: "http://[fe80::1%25eth0]/", want: ErrBlockedAddress},
		{url: "http://169.254.169.254/latest/meta-data/", want: ErrBlockedAddress},
		{url: "http://10.0.0.1/", want: ErrBlockedAddress},
		{url: "http://0.0.0.0:80/", want: ErrBlockedAddress},
		{url: "http://localhost:8080/", want: ErrBlockedAddress},
		{url: "http://LOCALHOST./", want: ErrBlockedAddress},
		{url: "http://api.localhost/", want: ErrBlockedAddress},
		{url: "http://127.0.0.1:8080/", allow: []string{"127.0.0.0/8"}},
		{url: "http://localhost:8080/", allow: []string{"127.0.0.0/8"}},
		{url: "http://localhost:8080/", allow: []string{"::1/128"}},
		{url: "http://[::1]:8080/", allow: []string{"127.0.0.0/8"}, want: ErrBlockedAddress},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			u, err := mustPolicy(t, tt.allow...).CheckURL(tt.url)
			if tt.want == nil {
				if err != nil || u == nil {
					t.Fatalf("CheckURL(%q) = %v, %v; want a URL", tt.url, u, err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("CheckURL(%q) = %v, want %v", tt.url, err, tt.want)
			}
		})
	}
}

func TestCheckURLErrorHidesQuery(t *testing.T) {
	_, err := (&Policy{}).CheckURL("https://example.com/%zz?token=secret")
	if err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("CheckURL error = %v, want an error without the query", err)
	}
}

// listen returns the address of a TCP listener on loopback that accepts and
// closes connections until the test ends.
func listen(t *testing.T, network, address string) string {
	t.Helper()
	ln, err := net.Listen(network, address)
	if err != nil {
		t.Skipf("listen %s %s: %v", network, address, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

func TestDialContext(t *testing.T) {
	addr4 := listen(t, "tcp4", "127.0.0.1:0")
	_, port, _ := net.SplitHostPort(addr4)
	tests := []struct {
		name    string
		address string
		allow   []string
		blocked bool
	}{
		{name: "ip refused", address: addr4, blocked: true},
		{name: "ip allowed", address: addr4, allow: []string{"127.0.0.0/8"}},
		// A name is resolved by the dialer, and the resolved address is what
		// gets checked: "localhost" cannot smuggle loopback in.
		{name: "name refused", address: net.JoinHostPort("localhost", port), blocked: true},
		{name: "mapped refused", address: net.JoinHostPort("::ffff:127.0.0.1", port), blocked: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dial := mustPolicy(t, tt.allow...).DialContext(&net.Dialer{Timeout: 5 * time.Second})
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			conn, err := dial(ctx, "tcp", tt.address)
			if conn != nil {
				conn.Close()
			}
			if tt.blocked {
				if !errors.Is(err, ErrBlockedAddress) {
					t.Fatalf("dial %s = %v, want ErrBlockedAddress", tt.address, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("dial %s = %v, want a connection", tt.address, err)
			}
		})
	}
}

func TestDialContextKeepsDialerControl(t *testing.T) {
	addr := listen(t, "tcp4", "127.0.0.1:0")
	var called bool
	d := &net.Dialer{Control: func(network, address string, _ syscall.RawConn) error {
		called = true
		return nil
	}}
	conn, err := mustPolicy(t, "127.0.0.0/8").DialContext(d)(t.Context(), "tcp", addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	conn.Close()
	if !called {
		t.Fatal("the dialer's own Control was not called")
	}
}

func TestControlRefusesOtherNetworks(t *testing.T) {
	p := mustPolicy(t, "127.0.0.0/8")
	for _, network := range []string{"udp", "unix", "ip4:icmp"} {
		if err := p.Control(network, "127.0.0.1:53", nil); !errors.Is(err, ErrBlockedAddress) {
			t.Errorf("Control(%s) = %v, want ErrBlockedAddress", network, err)
		}
	}
	if err := p.Control("tcp", "not-an-address", nil); !errors.Is(err, ErrBlockedAddress) {
		t.Errorf("Control(tcp, not-an-address) = %v, want ErrBlockedAddress", err)
	}
}
