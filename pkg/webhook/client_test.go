package webhook

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
)

func loopbackPolicy(t *testing.T) *netguard.Policy {
	t.Helper()
	p, err := netguard.NewPolicy([]string{"127.0.0.0/8", "::1/128"})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func newClient(t *testing.T, p *netguard.Policy, opts ClientOptions) *Client {
	c := NewClient(p, opts)
	t.Cleanup(c.CloseIdleConnections)
	return c
}

func newServer(t *testing.T, h http.HandlerFunc) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// received is what a test receiver saw of one request.
type received struct {
	header http.Header
	body   []byte
}

// recorder returns a handler that records each request on the returned
// channel, then answers status.
func recorder(t *testing.T, status int) (http.HandlerFunc, <-chan received) {
	ch := make(chan received, 16)
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("receiver: read body: %v", err)
		}
		ch <- received{header: r.Header.Clone(), body: body}
		w.WriteHeader(status)
	}, ch
}

func TestSendStatus(t *testing.T) {
	date := time.Now().Add(2 * time.Minute).UTC().Format(http.TimeFormat)
	const (
		OK        = eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED
		SERVER    = eventv1.ErrorClass_ERROR_CLASS_SERVER
		THROTTLED = eventv1.ErrorClass_ERROR_CLASS_THROTTLED
		TIMEOUT   = eventv1.ErrorClass_ERROR_CLASS_TIMEOUT
		CLIENT    = eventv1.ErrorClass_ERROR_CLASS_CLIENT
		OTHER     = eventv1.ErrorClass_ERROR_CLASS_OTHER
	)
	tests := []struct {
		name       string
		status     int
		retryAfter string
		success    []int32
		class      eventv1.ErrorClass
		permanent  bool
		gone       bool
		minRetry   time.Duration
		maxRetry   time.Duration
	}{
		{name: "200", status: 200, class: OK},
		{name: "204", status: 204, class: OK},
		{name: "200 exact", status: 200, success: []int32{200}, class: OK},
		{name: "202 custom", status: 202, success: []int32{200, 202}, class: OK},
		{name: "204 not in success codes", status: 204, success: []int32{200}, class: OTHER},
		{name: "500", status: 500, class: SERVER},
		{name: "503 retry-after seconds", status: 503, retryAfter: "7", class: SERVER, minRetry: 7 * time.Second, maxRetry: 7 * time.Second},
		{name: "429 retry-after seconds", status: 429, retryAfter: "30", class: THROTTLED, minRetry: 30 * time.Second, maxRetry: 30 * time.Second},
		{name: "429 retry-after date", status: 429, retryAfter: date, class: THROTTLED, minRetry: time.Minute, maxRetry: 2 * time.Minute},
		{name: "429 retry-after capped", status: 429, retryAfter: "99999999", class: THROTTLED, minRetry: time.Hour, maxRetry: time.Hour},
		{name: "408", status: 408, class: TIMEOUT},
		{name: "410", status: 410, class: CLIENT, permanent: true, gone: true},
		{name: "400", status: 400, class: CLIENT, permanent: true},
		{name: "404", status: 404, class: CLIENT, permanent: true},
		{name: "301 not followed", status: 301, class: CLIENT, permanent: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var redirected atomic.Bool
			srv := newServer(t, func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/elsewhere" {
					redirected.Store(true)
				}
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				if tt.status/100 == 3 {
					w.Header().Set("Location", "/elsewhere")
				}
				w.WriteHeader(tt.status)
			})
			c := newClient(t, loopbackPolicy(t), ClientOptions{})
			res := c.Send(t.Context(), Request{URL: srv.URL + "/hook", ID: "msg_1", Body: []byte("[]"), SuccessCodes: tt.success})
			if res.Status != tt.status || res.Class != tt.class || res.OK() != (tt.class == OK) {
				t.Fatalf("Send = %+v, want status %d class %v", res, tt.status, tt.class)
			}
			if res.OK() != (res.Err == nil) || !res.OK() && !errors.Is(res.Err, ErrStatus) {
				t.Fatalf("Send err = %v", res.Err)
			}
			if res.Permanent() != tt.permanent || res.Gone != tt.gone {
				t.Fatalf("Send = %+v, want permanent %v gone %v", res, tt.permanent, tt.gone)
			}
			if res.RetryAfter < tt.minRetry || res.RetryAfter > tt.maxRetry {
				t.Fatalf("RetryAfter = %s, want in [%s, %s]", res.RetryAfter, tt.minRetry, tt.maxRetry)
			}
			if res.Latency <= 0 {
				t.Fatalf("Latency = %s, want > 0", res.Latency)
			}
			if redirected.Load() {
				t.Fatal("the redirect was followed")
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		value string
		want  time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"120", 2 * time.Minute},
		{" 5 ", 5 * time.Second},
		{"-5", 0},
		{"3600", time.Hour},
		{"3601", time.Hour},
		{"99999999999999999", time.Hour},
		{"-99999999999999999", 0},
		{"1.5", 0},
		{"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
		{now.Add(48 * time.Hour).Format(http.TimeFormat), time.Hour},
		{now.Add(30 * time.Second).Format(time.RFC850), 30 * time.Second},
		{now.Add(30 * time.Second).Format(time.ANSIC), 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.value, func(t *testing.T) {
			if got := parseRetryAfter(tt.value, now); got != tt.want {
				t.Fatalf("parseRetryAfter(%q) = %s, want %s", tt.value, got, tt.want)
			}
		})
	}
}

func TestSendHeadersAndSignatures(t *testing.T) {
	h, got := recorder(t, 200)
	srv := newServer(t, h)
	oldKey, newKey := mustSecret(t, vectorSecret), mustSecret(t, mustNewSecret(t))
	c := newClient(t, loopbackPolicy(t), ClientOptions{UserAgent: "bulkhead-test"})
	body := []byte(`[{"key":"k"}]`)

	before := time.Now().Truncate(time.Second)
	res := c.Send(t.Context(), Request{URL: srv.URL, ID: "msg_abc", Body: body, Secrets: [][]byte{oldKey, newKey}})
	if !res.OK() {
		t.Fatalf("Send = %+v", res)
	}
	r := <-got
	for key, want := range map[string]string{
		"Content-Type":   "application/json",
		"User-Agent":     "bulkhead-test",
		HeaderID:         "msg_abc",
		"Content-Length": strconv.Itoa(len(body)),
	} {
		if v := r.header.Get(key); v != want {
			t.Errorf("header %s = %q, want %q", key, v, want)
		}
	}
	if v := r.header.Get("Content-Encoding"); v != "" {
		t.Errorf("Content-Encoding = %q, want none", v)
	}
	ts, err := strconv.ParseInt(r.header.Get(HeaderTimestamp), 10, 64)
	if err != nil || ts < before.Unix() || ts > time.Now().Unix() {
		t.Errorf("webhook-timestamp = %q, want the time of the attempt", r.header.Get(HeaderTimestamp))
	}
	if !bytes.Equal(r.body, body) {
		t.Errorf("body = %q, want %q", r.body, body)
	}
	// During a rotation both signatures are sent, and a receiver holding
	// either secret alone accepts the message.
	if n := len(strings.Fields(r.header.Get(HeaderSignature))); n != 2 {
		t.Errorf("webhook-signature has %d signatures, want 2", n)
	}
	for i, key := range [][]byte{oldKey, newKey} {
		if err := Verify([][]byte{key}, r.header, r.body, time.Minute, time.Now()); err != nil {
			t.Errorf("Verify with secret %d: %v", i, err)
		}
	}
}

func mustNewSecret(t *testing.T) string {
	s, err := NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSendGzip(t *testing.T) {
	h, got := recorder(t, 200)
	srv := newServer(t, h)
	key := mustSecret(t, vectorSecret)
	body, err := EncodeBody(benchImpressions(50))
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, loopbackPolicy(t), ClientOptions{})
	if res := c.Send(t.Context(), Request{URL: srv.URL, ID: "msg_gz", Body: body, Gzip: true, Secrets: [][]byte{key}}); !res.OK() {
		t.Fatalf("Send = %+v", res)
	}
	r := <-got
	if v := r.header.Get("Content-Encoding"); v != "gzip" {
		t.Fatalf("Content-Encoding = %q, want gzip", v)
	}
	zr, err := gzip.NewReader(bytes.NewReader(r.body))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(plain, body) {
		t.Fatal("decompressed body differs from the JSON sent")
	}
	if len(r.body) >= len(body) {
		t.Errorf("gzip body is %d bytes, JSON %d", len(r.body), len(body))
	}
	if err := Verify([][]byte{key}, r.header, plain, time.Minute, time.Now()); err != nil {
		t.Fatalf("Verify of the decompressed body: %v", err)
	}
}

func TestSendTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(func() { close(release) }) // Runs before srv.Close, which waits for handlers.
	c := newClient(t, loopbackPolicy(t), ClientOptions{})

	start := time.Now()
	res := c.Send(t.Context(), Request{URL: srv.URL, ID: "msg_t", Body: []byte("[]"), Timeout: 200 * time.Millisecond})
	elapsed := time.Since(start)
	if res.Class != eventv1.ErrorClass_ERROR_CLASS_TIMEOUT || res.OK() || res.Permanent() {
		t.Fatalf("Send = %+v, want TIMEOUT", res)
	}
	if elapsed < 200*time.Millisecond || elapsed > 5*time.Second {
		t.Fatalf("Send took %s, want about 200ms", elapsed)
	}
}

func TestSendConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // Nothing listens there now.
	c := newClient(t, loopbackPolicy(t), ClientOptions{})
	res := c.Send(t.Context(), Request{URL: "http://" + addr + "/hook", ID: "msg_c", Body: []byte("[]")})
	if res.Class != eventv1.ErrorClass_ERROR_CLASS_CONNECT || res.Status != 0 || res.Permanent() {
		t.Fatalf("Send = %+v, want CONNECT", res)
	}
}

func TestSendBlocked(t *testing.T) {
	h, got := recorder(t, 200)
	srv := newServer(t, h)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	deny, err := netguard.NewPolicy(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name   string
		policy *netguard.Policy
		url    string
	}{
		{name: "ip", policy: deny, url: srv.URL},
		{name: "localhost", policy: deny, url: "http://localhost:" + port},
		{name: "nil policy", policy: nil, url: srv.URL},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClient(t, tt.policy, ClientOptions{})
			res := c.Send(t.Context(), Request{URL: tt.url, ID: "msg_b", Body: []byte("[]")})
			if res.Class != eventv1.ErrorClass_ERROR_CLASS_BLOCKED || !res.Permanent() || !errors.Is(res.Err, netguard.ErrBlockedAddress) {
				t.Fatalf("Send = %+v, want BLOCKED", res)
			}
		})
	}
	select {
	case <-got:
		t.Fatal("a blocked request reached the server")
	default:
	}
}

func TestSendBadRequest(t *testing.T) {
	c := newClient(t, loopbackPolicy(t), ClientOptions{})
	tests := []struct {
		name      string
		req       Request
		want      error
		permanent bool
	}{
		{name: "bad url", req: Request{URL: "ftp://example.com/", ID: "msg"}, want: netguard.ErrBadURL, permanent: true},
		{name: "no id", req: Request{URL: "http://127.0.0.1:1/"}, want: ErrNoID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := c.Send(t.Context(), tt.req)
			if !errors.Is(res.Err, tt.want) || res.Permanent() != tt.permanent {
				t.Fatalf("Send = %+v, want %v permanent %v", res, tt.want, tt.permanent)
			}
		})
	}
}

func TestSendTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // The failed handshake is expected.
	srv.StartTLS()
	t.Cleanup(srv.Close)
	untrusted := newClient(t, loopbackPolicy(t), ClientOptions{})
	res := untrusted.Send(t.Context(), Request{URL: srv.URL, ID: "msg_tls", Body: []byte("[]")})
	if res.Class != eventv1.ErrorClass_ERROR_CLASS_TLS {
		t.Fatalf("Send to an untrusted certificate = %+v, want TLS", res)
	}
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	trusted := newClient(t, loopbackPolicy(t), ClientOptions{TLSConfig: &tls.Config{RootCAs: roots}})
	if res := trusted.Send(t.Context(), Request{URL: srv.URL, ID: "msg_tls", Body: []byte("[]")}); !res.OK() {
		t.Fatalf("Send with the server's root = %+v, want OK", res)
	}
}

func TestSendReusesConnections(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A body the client must drain before the connection can be reused.
		_, _ = w.Write(bytes.Repeat([]byte("x"), 16<<10))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	c := newClient(t, loopbackPolicy(t), ClientOptions{})
	for i := range 3 {
		if res := c.Send(t.Context(), Request{URL: srv.URL, ID: fmt.Sprint("msg_", i), Body: []byte("[]")}); !res.OK() {
			t.Fatalf("Send %d = %+v", i, res)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for 3 sequential requests, want 1", n)
	}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want eventv1.ErrorClass
	}{
		{"blocked", fmt.Errorf("dial: %w", netguard.ErrBlockedAddress), eventv1.ErrorClass_ERROR_CLASS_BLOCKED},
		{"bad url", netguard.ErrBadURL, eventv1.ErrorClass_ERROR_CLASS_CLIENT},
		{"dns", &net.OpError{Op: "dial", Err: &net.DNSError{Err: "no such host", Name: "x.invalid", IsNotFound: true}}, eventv1.ErrorClass_ERROR_CLASS_DNS},
		{"deadline", fmt.Errorf("post: %w", context.DeadlineExceeded), eventv1.ErrorClass_ERROR_CLASS_TIMEOUT},
		{"dial timeout", &net.OpError{Op: "dial", Err: timeoutError{}}, eventv1.ErrorClass_ERROR_CLASS_TIMEOUT},
		{"refused", &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, eventv1.ErrorClass_ERROR_CLASS_CONNECT},
		{"reset", &net.OpError{Op: "read", Err: syscall.ECONNRESET}, eventv1.ErrorClass_ERROR_CLASS_CONNECT},
		{"unreachable", &net.OpError{Op: "dial", Err: syscall.EHOSTUNREACH}, eventv1.ErrorClass_ERROR_CLASS_CONNECT},
		{"eof", fmt.Errorf("post: %w", io.EOF), eventv1.ErrorClass_ERROR_CLASS_CONNECT},
		{"tls alert", &net.OpError{Op: "remote error", Err: tls.AlertError(40)}, eventv1.ErrorClass_ERROR_CLASS_TLS},
		{"tls record", tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}, eventv1.ErrorClass_ERROR_CLASS_TLS},
		{"tls verify", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}, eventv1.ErrorClass_ERROR_CLASS_TLS},
		{"canceled", context.Canceled, eventv1.ErrorClass_ERROR_CLASS_OTHER},
		{"other", errors.New("something"), eventv1.ErrorClass_ERROR_CLASS_OTHER},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classify(tt.err); got != tt.want {
				t.Fatalf("classify(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }
