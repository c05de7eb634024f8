// Package fleet runs a fleet of real HTTP webhook receivers on loopback whose
// behaviour (healthy, hanging, refusing, failing, slow, flapping, throttling)
// can be switched at run time, and records what each one accepted.
package fleet

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Behavior is how an endpoint answers.
type Behavior int32

// The behaviours an endpoint can have. Only Healthy, SlowOK and the healthy
// half of Flapping answer 2xx, and only those requests are recorded as
// arrivals.
const (
	// Healthy answers 200 at once.
	Healthy Behavior = iota
	// Hang accepts the request, reads the body and never answers, until the
	// fleet closes or the client goes away; then the connection is dropped
	// without an answer. It stands for a destination in a region that is down.
	Hang
	// Refused closes the endpoint's listener and its open connections, so
	// new connections are refused. Switching away listens again on the same
	// port.
	Refused
	// Status503 answers 503 Service Unavailable.
	Status503
	// SlowOK answers 200 after Options.SlowDelay.
	SlowOK
	// Flapping answers 503 for Options.FlapPeriod, then 200 for
	// Options.FlapPeriod, and so on, counted from when it was set.
	Flapping
	// Throttled answers 429 Too Many Requests with "Retry-After: 1".
	Throttled
	// ThrottledLong answers 429 with a Retry-After of Options.RetryAfter.
	ThrottledLong
	// Reject400 answers 400 Bad Request to everything: a permanent refusal.
	Reject400
)

var behaviorNames = [...]string{"healthy", "hang", "refused", "503", "slow-ok", "flapping", "throttled", "throttled-long", "reject-400"}

// String returns the behaviour's short name.
func (b Behavior) String() string {
	if b >= 0 && int(b) < len(behaviorNames) {
		return behaviorNames[b]
	}
	return "behavior(" + strconv.Itoa(int(b)) + ")"
}

// ErrClosed is returned by Set after Close.
var ErrClosed = errors.New("fleet closed")

// ErrNoEndpoint is returned for an endpoint index outside [0, Len()).
var ErrNoEndpoint = errors.New("no such endpoint")

// ErrBehavior is returned by Set for a value that is not one of the declared
// behaviours.
var ErrBehavior = errors.New("unknown behavior")

// Default option values.
const (
	DefaultSlowDelay  = 2 * time.Second
	DefaultFlapPeriod = 5 * time.Second
	DefaultRetryAfter = 20 * time.Second
	// DefaultMaxBody bounds a request body (after decompression).
	DefaultMaxBody = 32 << 20
	// relistenFor bounds how long Set retries listening on the old port.
	relistenFor = 2 * time.Second
)

// Options configures a Fleet. The zero value is usable.
type Options struct {
	// SlowDelay is how long SlowOK waits before answering 200
	// (DefaultSlowDelay when zero).
	SlowDelay time.Duration
	// FlapPeriod is the length of each half of Flapping
	// (DefaultFlapPeriod when zero).
	FlapPeriod time.Duration
	// RetryAfter is ThrottledLong's Retry-After (DefaultRetryAfter when zero).
	RetryAfter time.Duration
	// MaxBody bounds a request body, compressed or not (DefaultMaxBody when
	// zero). Larger bodies are answered 413.
	MaxBody int64
	// OnArrival, when set, receives every arrival synchronously from the
	// handler, before the 2xx is written, and the fleet does not buffer
	// arrivals (Drain returns nothing). It is called concurrently from many
	// handlers and must be fast. The fleet never reuses Arrival.Keys, so
	// the callback may keep it.
	OnArrival func(Arrival)
}

func (o Options) withDefaults() (Options, error) {
	if o.SlowDelay < 0 || o.FlapPeriod < 0 || o.MaxBody < 0 {
		return o, errors.New("negative option")
	}
	if o.SlowDelay == 0 {
		o.SlowDelay = DefaultSlowDelay
	}
	if o.FlapPeriod == 0 {
		o.FlapPeriod = DefaultFlapPeriod
	}
	if o.RetryAfter == 0 {
		o.RetryAfter = DefaultRetryAfter
	}
	if o.MaxBody == 0 {
		o.MaxBody = DefaultMaxBody
	}
	return o, nil
}

// Arrival is one request an endpoint answered 2xx.
type Arrival struct {
	// Endpoint is the endpoint's index.
	Endpoint int
	// At is when the body had been read and decoded and the 2xx was about
	// to be written (for SlowOK: after the delay).
	At time.Time
	// WebhookID is the request's webhook-id header.
	WebhookID string
	// Keys are the impressions' keys, in body order.
	Keys []string
}

// Stats counts what one endpoint, or the whole fleet, saw. Every request
// that reached a handler is counted in Requests and in exactly one of the
// outcome counters below it.
type Stats struct {
	// Requests reached a handler.
	Requests int64 `json:"requests"`
	// OK were answered 200 and recorded as arrivals.
	OK int64 `json:"ok"`
	// Status503 were answered 503 (Status503 or failing half of Flapping).
	Status503 int64 `json:"status_503"`
	// Status429 were answered 429 (Throttled).
	Status429 int64 `json:"status_429"`
	// BadRequest had a body that could not be read, decompressed or decoded
	// (answered 400), was too large (answered 413), or met Reject400.
	BadRequest int64 `json:"bad_request"`
	// Dropped got no answer: they were hung (Hang), the client left during
	// SlowOK's delay, the endpoint switched to Refused while they were in a
	// handler, or the fleet closed.
	Dropped int64 `json:"dropped"`
	// Hung is the subset of Dropped held by Hang.
	Hung int64 `json:"hung"`
	// Impressions is the number of impressions in OK requests, duplicates
	// included.
	Impressions int64 `json:"impressions"`
	// Duplicates counts impressions in OK requests whose key the same
	// endpoint had already accepted (keys are compared by a 64-bit seeded
	// hash; a false duplicate needs a hash collision, about 1 in 10^6 at 6M
	// keys per endpoint).
	Duplicates int64 `json:"duplicates"`
	// DuplicateIDs counts OK requests whose webhook-id the same endpoint had
	// already accepted (a batch delivered again).
	DuplicateIDs int64 `json:"duplicate_ids"`
}

func (s *Stats) add(o Stats) {
	s.Requests += o.Requests
	s.OK += o.OK
	s.Status503 += o.Status503
	s.Status429 += o.Status429
	s.BadRequest += o.BadRequest
	s.Dropped += o.Dropped
	s.Hung += o.Hung
	s.Impressions += o.Impressions
	s.Duplicates += o.Duplicates
	s.DuplicateIDs += o.DuplicateIDs
}

// Fleet is a set of HTTP receivers, each on its own 127.0.0.1 port with its
// own http.Server (keep-alive on). Its methods are safe for concurrent use.
type Fleet struct {
	opts Options
	eps  []*endpoint
	seed maphash.Seed
	// delivered counts impressions in OK requests, read lock-free by
	// Delivered and WaitDelivered.
	delivered atomic.Int64

	// done is closed by Close and releases hanging and slow handlers.
	done chan struct{}
	// mu guards closed; handlers register in handlers under mu.RLock while
	// !closed, so every Add happens before Close's Wait.
	mu       sync.RWMutex
	closed   bool
	handlers sync.WaitGroup
	// serving tracks Serve goroutines; each Add happens under an endpoint's
	// mu while that endpoint is open, hence before Close's Wait.
	serving sync.WaitGroup
	errLog  *log.Logger
}

// mode is an endpoint's behaviour and when it was set (Flapping's clock).
type mode struct {
	b     Behavior
	since time.Time
}

type endpoint struct {
	f    *Fleet
	idx  int
	addr string // 127.0.0.1:port, fixed for the endpoint's life
	url  string
	mode atomic.Pointer[mode]

	// mu guards srv and closed (lifecycle), and seen, ids, arrivals
	// (recording).
	mu       sync.Mutex
	srv      *http.Server
	served   chan struct{} // closed when srv's Serve has returned
	closed   bool
	seen     map[uint64]struct{}
	ids      map[string]struct{}
	arrivals []Arrival

	requests, ok, s503, s429, bad, dropped, hung atomic.Int64
	impressions, dups, dupIDs                    atomic.Int64
}

// New starts n Healthy endpoints, each on its own 127.0.0.1:0 port.
func New(n int, opts Options) (*Fleet, error) {
	if n <= 0 {
		return nil, fmt.Errorf("new fleet: n = %d, want > 0", n)
	}
	o, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("new fleet: %w", err)
	}
	f := &Fleet{
		opts:   o,
		seed:   maphash.MakeSeed(),
		done:   make(chan struct{}),
		errLog: log.New(io.Discard, "", 0),
	}
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("new fleet: listen endpoint %d: %w", i, err)
		}
		addr := ln.Addr().String()
		ep := &endpoint{
			f:    f,
			idx:  i,
			addr: addr,
			url:  "http://" + addr + "/",
			seen: make(map[uint64]struct{}),
			ids:  make(map[string]struct{}),
		}
		ep.mode.Store(&mode{b: Healthy, since: time.Now()})
		f.eps = append(f.eps, ep)
		ep.mu.Lock()
		ep.serveLocked(ln)
		ep.mu.Unlock()
	}
	return f, nil
}

// Len returns the number of endpoints.
func (f *Fleet) Len() int { return len(f.eps) }

// URL returns endpoint i's URL ("http://127.0.0.1:<port>/"); it stays the
// same across behaviour changes. It panics if i is out of range.
func (f *Fleet) URL(i int) string { return f.eps[i].url }

// Behavior returns endpoint i's current behaviour. It panics if i is out of
// range.
func (f *Fleet) Behavior(i int) Behavior { return f.eps[i].mode.Load().b }

// Set switches endpoint i to b. Switching to Refused closes the endpoint's
// listener and every open connection (so a keep-alive client cannot slip
// through); switching away from Refused listens again on the same port,
// retrying for up to 2 s while the port is in use. Requests already in a
// handler keep the behaviour they started with, except that switching to
// Refused drops them. Setting Flapping (again) restarts its clock.
func (f *Fleet) Set(i int, b Behavior) error {
	if i < 0 || i >= len(f.eps) {
		return fmt.Errorf("set endpoint %d: %w", i, ErrNoEndpoint)
	}
	if b < Healthy || b > Reject400 {
		return fmt.Errorf("set endpoint %d: %w: %d", i, ErrBehavior, b)
	}
	ep := f.eps[i]
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if ep.closed {
		return fmt.Errorf("set endpoint %d: %w", i, ErrClosed)
	}
	next := &mode{b: b, since: time.Now()}
	old := ep.mode.Load()
	switch {
	case b == Refused && old.b != Refused:
		// Store first so a handler racing with the close drops its request.
		ep.mode.Store(next)
		srv := ep.srv
		ep.srv = nil
		if err := srv.Close(); err != nil {
			return fmt.Errorf("set endpoint %d refused: %w", i, err)
		}
		// The listening socket is released only when the blocked Accept
		// returns; until then a dial would still complete (then be reset).
		<-ep.served
	case b != Refused && old.b == Refused:
		ln, err := listenAgain(ep.addr)
		if err != nil {
			return fmt.Errorf("set endpoint %d %s: %w", i, b, err)
		}
		ep.mode.Store(next)
		ep.serveLocked(ln)
	default:
		ep.mode.Store(next)
	}
	return nil
}

// listenAgain listens on addr, retrying while the port is still in use,
// for at most relistenFor.
func listenAgain(addr string) (net.Listener, error) {
	deadline := time.Now().Add(relistenFor)
	for {
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			return ln, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveLocked starts an http.Server for the endpoint on ln.
// ep.mu must be held and the endpoint open.
func (ep *endpoint) serveLocked(ln net.Listener) {
	srv := &http.Server{
		Handler:           ep,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          ep.f.errLog,
	}
	served := make(chan struct{})
	ep.srv = srv
	ep.served = served
	ep.f.serving.Add(1)
	go func() {
		defer ep.f.serving.Done()
		defer close(served)
		// Serve returns http.ErrServerClosed on Close/Shutdown; an accept
		// failure ends this endpoint's serving either way.
		_ = srv.Serve(ln)
	}()
}

// Delivered returns the number of impressions in requests answered 2xx so
// far, duplicates included. It does not lock.
func (f *Fleet) Delivered() int64 { return f.delivered.Load() }

// WaitDelivered polls Delivered every step until it reaches n, returning nil,
// or until ctx ends, returning ctx's error.
func (f *Fleet) WaitDelivered(ctx context.Context, n int64, step time.Duration) error {
	t := time.NewTicker(step)
	defer t.Stop()
	for f.delivered.Load() < n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait delivered %d (have %d): %w", n, f.delivered.Load(), ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// Drain returns the arrivals recorded since the previous Drain, endpoint by
// endpoint, each endpoint's in arrival order, and forgets them, so a caller
// that drains periodically keeps memory bounded. It returns nothing when
// Options.OnArrival is set.
func (f *Fleet) Drain() []Arrival {
	var out []Arrival
	for _, ep := range f.eps {
		ep.mu.Lock()
		a := ep.arrivals
		ep.arrivals = nil
		ep.mu.Unlock()
		if out == nil {
			out = a
		} else {
			out = append(out, a...)
		}
	}
	return out
}

// Stats returns endpoint i's counters. It panics if i is out of range.
func (f *Fleet) Stats(i int) Stats { return f.eps[i].stats() }

// Total returns the counters summed over all endpoints.
func (f *Fleet) Total() Stats {
	var s Stats
	for _, ep := range f.eps {
		s.add(ep.stats())
	}
	return s
}

func (ep *endpoint) stats() Stats {
	return Stats{
		Requests:     ep.requests.Load(),
		OK:           ep.ok.Load(),
		Status503:    ep.s503.Load(),
		Status429:    ep.s429.Load(),
		BadRequest:   ep.bad.Load(),
		Dropped:      ep.dropped.Load(),
		Hung:         ep.hung.Load(),
		Impressions:  ep.impressions.Load(),
		Duplicates:   ep.dups.Load(),
		DuplicateIDs: ep.dupIDs.Load(),
	}
}

// Close releases hanging and slow handlers, stops every endpoint and waits
// for their goroutines. It is idempotent.
func (f *Fleet) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	close(f.done)
	f.mu.Unlock()

	var errs []error
	for _, ep := range f.eps {
		ep.mu.Lock()
		ep.closed = true
		srv := ep.srv
		ep.srv = nil
		ep.mu.Unlock()
		if srv == nil {
			continue
		}
		// Handlers were released by done, so Shutdown only waits for them to
		// return; Close is the fallback if one does not in time.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := srv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shutdown endpoint %d: %w", ep.idx, err))
			_ = srv.Close()
		}
		cancel()
	}
	f.handlers.Wait()
	f.serving.Wait()
	return errors.Join(errs...)
}

// enter registers a handler; false means the fleet is closing.
func (f *Fleet) enter() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed {
		return false
	}
	f.handlers.Add(1)
	return true
}

// ServeHTTP answers according to the endpoint's behaviour.
func (ep *endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ep.requests.Add(1)
	if !ep.f.enter() {
		ep.drop(w)
		return
	}
	defer ep.f.handlers.Done()

	m := ep.mode.Load()
	if m.b == Refused {
		ep.drop(w)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, ep.f.opts.MaxBody))
	if err != nil {
		ep.bad.Add(1)
		status := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			status = http.StatusRequestEntityTooLarge
		}
		http.Error(w, "read body", status)
		return
	}

	switch m.b {
	case Hang:
		ep.hung.Add(1)
		select {
		case <-r.Context().Done():
		case <-ep.f.done:
		}
		ep.drop(w)
	case Status503:
		ep.fail503(w)
	case Throttled, ThrottledLong:
		ep.s429.Add(1)
		after := "1"
		if m.b == ThrottledLong {
			after = strconv.Itoa(int(ep.f.opts.RetryAfter.Seconds()))
		}
		w.Header().Set("Retry-After", after)
		http.Error(w, "throttled", http.StatusTooManyRequests)
	case Reject400:
		ep.bad.Add(1)
		http.Error(w, "rejected", http.StatusBadRequest)
	case SlowOK:
		t := time.NewTimer(ep.f.opts.SlowDelay)
		defer t.Stop()
		select {
		case <-t.C:
			ep.accept(w, r, body)
		case <-r.Context().Done():
			ep.drop(w)
		case <-ep.f.done:
			ep.drop(w)
		}
	case Flapping:
		// Failing half first, so a switch to Flapping is visible at once.
		if (time.Since(m.since)/ep.f.opts.FlapPeriod)%2 == 0 {
			ep.fail503(w)
		} else {
			ep.accept(w, r, body)
		}
	default:
		ep.accept(w, r, body)
	}
}

func (ep *endpoint) fail503(w http.ResponseWriter) {
	ep.s503.Add(1)
	http.Error(w, "unavailable", http.StatusServiceUnavailable)
}

// drop ends the request without any answer by closing its connection.
func (ep *endpoint) drop(w http.ResponseWriter) {
	ep.dropped.Add(1)
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			_ = c.Close()
			return
		}
	}
	// Not hijackable: abort the response so nothing, in particular no
	// implicit 200, reaches the client.
	panic(http.ErrAbortHandler)
}

// impression is the part of a webhook impression the fleet reads.
type impression struct {
	Key string `json:"key"`
}

// accept decodes body, records the arrival and answers 200.
func (ep *endpoint) accept(w http.ResponseWriter, r *http.Request, body []byte) {
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(bytes.NewReader(body))
		if err == nil {
			body, err = io.ReadAll(io.LimitReader(zr, ep.f.opts.MaxBody+1))
		}
		if err == nil && int64(len(body)) > ep.f.opts.MaxBody {
			err = errors.New("gzip body too large")
		}
		if err != nil {
			ep.bad.Add(1)
			http.Error(w, "gzip", http.StatusBadRequest)
			return
		}
	}
	var imps []impression
	if err := json.Unmarshal(body, &imps); err != nil {
		ep.bad.Add(1)
		http.Error(w, "json", http.StatusBadRequest)
		return
	}
	keys := make([]string, len(imps))
	hashes := make([]uint64, len(imps))
	for i, im := range imps {
		keys[i] = im.Key
		hashes[i] = maphash.String(ep.f.seed, im.Key)
	}
	a := Arrival{Endpoint: ep.idx, At: time.Now(), WebhookID: r.Header.Get("webhook-id"), Keys: keys}

	var dups int64
	ep.mu.Lock()
	for _, h := range hashes {
		if _, seen := ep.seen[h]; seen {
			dups++
		} else {
			ep.seen[h] = struct{}{}
		}
	}
	dupID := false
	if a.WebhookID != "" {
		if _, dupID = ep.ids[a.WebhookID]; !dupID {
			ep.ids[a.WebhookID] = struct{}{}
		}
	}
	if ep.f.opts.OnArrival == nil {
		ep.arrivals = append(ep.arrivals, a)
	}
	ep.mu.Unlock()

	if dupID {
		ep.dupIDs.Add(1)
	}
	ep.dups.Add(dups)
	ep.impressions.Add(int64(len(keys)))
	ep.ok.Add(1)
	ep.f.delivered.Add(int64(len(keys)))
	if cb := ep.f.opts.OnArrival; cb != nil {
		cb(a)
	}
	w.WriteHeader(http.StatusOK)
}
