package webhook

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/netguard"
)

// Defaults for ClientOptions and Request.
const (
	DefaultConnectTimeout      = 3 * time.Second
	DefaultTLSHandshakeTimeout = 3 * time.Second
	DefaultMaxIdleConnsPerHost = 4
	DefaultUserAgent           = "Bulkhead-Webhook/1"
	DefaultTimeout             = 10 * time.Second
)

const (
	// maxDrain is how much of a response body Send reads so the connection
	// can be reused; past it the connection is closed instead, so a large or
	// slow body never holds a worker.
	maxDrain = 64 << 10
	// maxRetryAfter caps Retry-After so a destination cannot stall itself
	// (and its backlog) indefinitely by mistake.
	maxRetryAfter = time.Hour
)

// ErrNoID is returned in Result.Err for a Request without an ID: receivers
// dedupe on webhook-id (invariant 4), so a message is never sent without one.
var ErrNoID = errors.New("request has no id")

// ErrStatus is wrapped in Result.Err when the destination answered with a
// status that is not a success.
var ErrStatus = errors.New("unexpected status")

// ClientOptions configure NewClient; zero fields take the defaults.
type ClientOptions struct {
	// ConnectTimeout bounds each TCP connect. Default DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// TLSHandshakeTimeout bounds each TLS handshake. Default DefaultTLSHandshakeTimeout.
	TLSHandshakeTimeout time.Duration
	// MaxIdleConnsPerHost is how many keep-alive connections are kept per
	// destination host. Default DefaultMaxIdleConnsPerHost.
	MaxIdleConnsPerHost int
	// UserAgent is sent with every request. Default DefaultUserAgent.
	UserAgent string
	// TLSConfig, when not nil, is used for https destinations (custom roots
	// in tests and private deployments). Nil means the system roots.
	TLSConfig *tls.Config
}

// Client sends webhook requests. It is safe for concurrent use; create one
// and share it, so connections are reused.
type Client struct {
	hc        *http.Client
	policy    *netguard.Policy
	userAgent string
}

// NewClient returns a Client whose every connection, including those to
// addresses DNS returns, is checked against policy. A nil policy refuses all
// non-public addresses.
func NewClient(policy *netguard.Policy, opts ClientOptions) *Client {
	if policy == nil {
		policy = &netguard.Policy{}
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.TLSHandshakeTimeout <= 0 {
		opts.TLSHandshakeTimeout = DefaultTLSHandshakeTimeout
	}
	if opts.MaxIdleConnsPerHost <= 0 {
		opts.MaxIdleConnsPerHost = DefaultMaxIdleConnsPerHost
	}
	if opts.UserAgent == "" {
		opts.UserAgent = DefaultUserAgent
	}
	tr := &http.Transport{
		// No proxy: the guarded dialer would check the proxy's address, not
		// the destination's.
		Proxy: nil,
		DialContext: policy.DialContext(&net.Dialer{
			Timeout:   opts.ConnectTimeout,
			KeepAlive: 30 * time.Second,
		}),
		TLSHandshakeTimeout:    opts.TLSHandshakeTimeout,
		ForceAttemptHTTP2:      true, // A custom DialContext turns HTTP/2 off otherwise.
		MaxIdleConnsPerHost:    opts.MaxIdleConnsPerHost,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
		DisableCompression:     true, // The response body is discarded anyway.
	}
	if opts.TLSConfig != nil {
		tr.TLSClientConfig = opts.TLSConfig.Clone()
	}
	return &Client{
		hc: &http.Client{
			Transport: tr,
			// Redirects are not followed: a signed batch goes to the
			// configured URL only, and a POST that is redirected is either
			// turned into a GET (301-303) or re-sent to a host the customer
			// did not register. See Result for how a 3xx is classified.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		policy:    policy,
		userAgent: opts.UserAgent,
	}
}

// CloseIdleConnections closes the connections kept alive for reuse. The
// Client stays usable.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Request is one delivery attempt.
type Request struct {
	// URL is the destination; it is checked with the Client's policy.
	URL string
	// ID is the webhook-id, the same for every retry of a batch.
	ID string
	// Body is the uncompressed body (see EncodeBody).
	Body []byte
	// Gzip compresses Body and sends Content-Encoding: gzip. The signature
	// still covers the uncompressed Body (see Send).
	Gzip bool
	// Secrets sign the request, one signature each; none means unsigned.
	Secrets [][]byte
	// Timeout bounds the whole attempt, from connect to the end of reading
	// the response. Zero means DefaultTimeout.
	Timeout time.Duration
	// SuccessCodes are the statuses that mean delivered; empty means any 2xx.
	SuccessCodes []int32
}

// Result is the outcome of one attempt.
//
// Class is ERROR_CLASS_UNSPECIFIED on success. Statuses are classified:
// 429 THROTTLED; 408 TIMEOUT (the destination says the exchange took too
// long; retryable, and it should count toward the destination's slowness);
// other 4xx CLIENT; 5xx SERVER; 3xx CLIENT, because redirects are not
// followed and retrying sends the same request to the same URL, so only a
// configuration change fixes it; a status outside SuccessCodes that is none
// of these (such as 204 when only 200 counts) OTHER.
type Result struct {
	// Status is the HTTP status, 0 when no response was received.
	Status int
	// Class classifies a failure.
	Class eventv1.ErrorClass
	// Err describes a failure; nil on success.
	Err error
	// Latency is the time from sending the request to the end of reading
	// the response.
	Latency time.Duration
	// RetryAfter is the destination's Retry-After, capped at one hour; 0 when
	// absent or unparsable.
	RetryAfter time.Duration
	// Gone reports a 410: the destination asks to be disabled.
	Gone bool
}

// OK reports whether the batch was delivered.
func (r Result) OK() bool { return r.Err == nil }

// Permanent reports whether retrying cannot help (CLIENT or BLOCKED): the
// batch should be parked with Err as the reason.
func (r Result) Permanent() bool {
	return r.Class == eventv1.ErrorClass_ERROR_CLASS_CLIENT || r.Class == eventv1.ErrorClass_ERROR_CLASS_BLOCKED
}

// Send makes one attempt to deliver req. It never retries: retry policy
// belongs to the caller, which must not hold a worker while waiting. When
// ctx itself is canceled (shutdown), Class is OTHER: the caller should check
// ctx.Err() before counting the attempt against the destination.
func (c *Client) Send(ctx context.Context, req Request) Result {
	u, err := c.policy.CheckURL(req.URL)
	if err != nil {
		return Result{Class: classify(err), Err: fmt.Errorf("send: %w", err)}
	}
	if req.ID == "" {
		return Result{Class: eventv1.ErrorClass_ERROR_CLASS_OTHER, Err: fmt.Errorf("send: %w", ErrNoID)}
	}
	body := req.Body // As sent on the wire.
	if req.Gzip {
		if body, err = Gzip(body); err != nil {
			return Result{Class: eventv1.ErrorClass_ERROR_CLASS_OTHER, Err: fmt.Errorf("send: %w", err)}
		}
	}
	timeout := req.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return Result{Class: eventv1.ErrorClass_ERROR_CLASS_OTHER, Err: fmt.Errorf("send: %w", err)}
	}
	// The timestamp is of this attempt. The signature covers the JSON, not
	// its gzip encoding: receivers verify the payload their framework hands
	// them, usually already decoded, and a proxy may re-encode in flight.
	now := time.Now()
	h := hreq.Header
	h.Set("Content-Type", "application/json")
	if req.Gzip {
		h.Set("Content-Encoding", "gzip")
	}
	h.Set("User-Agent", c.userAgent)
	h.Set(HeaderID, req.ID)
	h.Set(HeaderTimestamp, strconv.FormatInt(now.Unix(), 10))
	if len(req.Secrets) > 0 {
		h.Set(HeaderSignature, SignatureHeader(req.Secrets, req.ID, now, req.Body))
	}

	start := time.Now()
	resp, err := c.hc.Do(hreq)
	if err != nil {
		return Result{Class: classify(err), Err: fmt.Errorf("post %s: %w", u.Host, stripURL(err)), Latency: time.Since(start)}
	}
	// The status is the answer; an error while draining only costs the
	// connection its reuse.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
	_ = resp.Body.Close()
	res := Result{
		Status:     resp.StatusCode,
		Latency:    time.Since(start),
		RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()),
	}
	if success(resp.StatusCode, req.SuccessCodes) {
		return res
	}
	res.Class = statusClass(resp.StatusCode)
	res.Gone = resp.StatusCode == http.StatusGone
	res.Err = fmt.Errorf("post %s: %w %d", u.Host, ErrStatus, resp.StatusCode)
	return res
}

func success(code int, codes []int32) bool {
	if len(codes) == 0 {
		return code >= 200 && code <= 299
	}
	return slices.Contains(codes, int32(code))
}

// statusClass classifies a status that is not a success; see Result.
func statusClass(code int) eventv1.ErrorClass {
	switch {
	case code == http.StatusTooManyRequests:
		return eventv1.ErrorClass_ERROR_CLASS_THROTTLED
	case code == http.StatusRequestTimeout:
		return eventv1.ErrorClass_ERROR_CLASS_TIMEOUT
	case code >= 500 && code <= 599:
		return eventv1.ErrorClass_ERROR_CLASS_SERVER
	case code >= 300 && code <= 499:
		return eventv1.ErrorClass_ERROR_CLASS_CLIENT
	}
	return eventv1.ErrorClass_ERROR_CLASS_OTHER
}

// classify maps an error of a request that got no response to its class. The
// order matters: a refused address and a DNS failure are reported as such
// even when they surface as dial errors or timeouts.
func classify(err error) eventv1.ErrorClass {
	var (
		dnsErr *net.DNSError
		netErr net.Error
	)
	switch {
	case errors.Is(err, netguard.ErrBlockedAddress):
		return eventv1.ErrorClass_ERROR_CLASS_BLOCKED
	case errors.Is(err, netguard.ErrBadURL):
		return eventv1.ErrorClass_ERROR_CLASS_CLIENT
	case errors.As(err, &dnsErr):
		return eventv1.ErrorClass_ERROR_CLASS_DNS
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return eventv1.ErrorClass_ERROR_CLASS_TIMEOUT
	case isTLS(err):
		return eventv1.ErrorClass_ERROR_CLASS_TLS
	case isConnect(err):
		return eventv1.ErrorClass_ERROR_CLASS_CONNECT
	}
	return eventv1.ErrorClass_ERROR_CLASS_OTHER
}

func isTLS(err error) bool {
	var (
		recordErr tls.RecordHeaderError
		verifyErr *tls.CertificateVerificationError
		alertErr  tls.AlertError
		echErr    *tls.ECHRejectionError
		opErr     *net.OpError
	)
	return errors.As(err, &recordErr) || errors.As(err, &verifyErr) ||
		errors.As(err, &alertErr) || errors.As(err, &echErr) ||
		// crypto/tls reports alerts it sends as OpError "local error"
		// (an unexported type), and those it receives as "remote error".
		errors.As(err, &opErr) && (opErr.Op == "local error" || opErr.Op == "remote error")
}

func isConnect(err error) bool {
	for _, target := range []error{
		syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.EHOSTDOWN, syscall.ENETDOWN,
		// The peer closed the connection without answering.
		io.EOF, io.ErrUnexpectedEOF,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "dial"
}

// stripURL drops the *url.Error layer of an http.Client error, whose message
// repeats the full URL: its query may hold the customer's token.
func stripURL(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		return uerr.Err
	}
	return err
}

// parseRetryAfter reads a Retry-After value, delta-seconds or an HTTP-date,
// as a duration from now in [0, maxRetryAfter]. Unparsable means 0.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		// Clamp before converting: a huge value would overflow Duration.
		secs = min(max(secs, 0), int64(maxRetryAfter/time.Second))
		d = time.Duration(secs) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), maxRetryAfter)
}
