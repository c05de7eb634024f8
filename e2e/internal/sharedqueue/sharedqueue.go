// Package sharedqueue is a reference model of the shared-worker webhook
// delivery design that caused the 12-hour delay, run in the benchmark beside
// Bulkhead under the same load and the same outage.
package sharedqueue

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// Model states exactly what this package models and what it leaves out. The
// benchmark report quotes it.
const Model = `Shared-queue reference model (the incident's design):
- ONE in-memory FIFO of delivery tasks for all destinations; a task is one
  batch of impressions for one destination URL, encoded once as the webhook
  JSON array (gzip optional), with a webhook-id stable across its retries and
  a Standard Webhooks signature per attempt.
- Batching: impressions submitted for a destination are merged into tasks of
  at most MaxBatch impressions; with Linger > 0 a partial batch waits at most
  Linger for more (set both to the Bulkhead deliverer's values); with Linger 0
  every Submit call becomes its own task(s). Fairness: with the deliverer's
  batch limits both systems send about the same number of POSTs for the same
  load, so the model gets no more and no fewer worker-occupying tasks than
  Bulkhead would; the latency a healthy destination sees comes from queueing
  behind failing tasks, not from batching.
- A FIXED pool of W workers (default 16) shared by all destinations takes
  tasks from the head of the FIFO, one POST at a time, with the same
  per-request timeout as Bulkhead (default 10s) and a connect timeout
  (default 2s). Keep-alive connections are reused.
- Any non-2xx answer or transport error is a failure: the task goes back to
  the TAIL of the same FIFO after an exponential backoff (1s, 2s, 4s ... capped
  at MaxBackoff, no jitter) kept by a timer, so no worker is held while
  waiting. After MaxAttempts attempts the task is dropped and counted as
  exhausted (the model has no dead-letter store).
- Submit never blocks and never refuses (unless MaxQueued is set): the FIFO
  is unbounded, as the incident's queue effectively was.
Left out, on purpose: circuit breakers, per-destination queues, concurrency
caps or fairness, quarantine, parking and replay, Retry-After, 4xx-as-
permanent, jitter, durability (the queue is in memory; nothing survives a
restart), and any broker or network hop between ingest and delivery (the
model is in-process, so it pays no JetStream cost Bulkhead pays).`

// Default option values.
const (
	DefaultWorkers        = 16
	DefaultRequestTimeout = 10 * time.Second
	DefaultConnectTimeout = 2 * time.Second
	DefaultFirstBackoff   = time.Second
	DefaultMaxBackoff     = 30 * time.Second
	DefaultMaxAttempts    = 10
	DefaultMaxBatch       = 500
)

// ErrClosed is returned by Submit after Close.
var ErrClosed = errors.New("shared queue closed")

// ErrFull is returned by Submit when Options.MaxQueued is set and accepting
// the impressions would exceed it.
var ErrFull = errors.New("shared queue full")

// ErrNotLoopback is the dial error for a destination that does not resolve
// to a loopback address: the model is a benchmark fixture and only talks to
// local receivers.
var ErrNotLoopback = errors.New("destination is not a loopback address")

// Options configures a Queue. Zero values take the defaults above.
type Options struct {
	// Workers is the size of the shared worker pool.
	Workers int
	// RequestTimeout bounds one POST, connection included.
	RequestTimeout time.Duration
	// ConnectTimeout bounds establishing the TCP connection.
	ConnectTimeout time.Duration
	// FirstBackoff is the wait before the second attempt; each further
	// attempt waits twice as long, up to MaxBackoff.
	FirstBackoff time.Duration
	// MaxBackoff caps the wait between attempts.
	MaxBackoff time.Duration
	// MaxAttempts is how many times a task is tried before it is dropped.
	MaxAttempts int
	// MaxBatch caps the impressions in one task (one POST).
	MaxBatch int
	// Linger is how long a partial batch waits for more impressions for the
	// same destination; 0 turns merging across Submit calls off.
	Linger time.Duration
	// MaxQueued, when > 0, caps impressions held (lingering, queued, in
	// flight or waiting to retry); Submit returns ErrFull beyond it.
	MaxQueued int64
	// Gzip compresses bodies and sets Content-Encoding: gzip.
	Gzip bool
	// Secret is the raw HMAC key for webhook-signature; nil sends no
	// signature.
	Secret []byte
	// Encode turns a batch into the POST body. Nil uses webhook.EncodeBody,
	// the deliverer's encoder, so both systems send byte-identical bodies.
	Encode func([]*ingestv1.Impression) ([]byte, error)
}

func (o Options) withDefaults() (Options, error) {
	if o.Workers < 0 || o.RequestTimeout < 0 || o.ConnectTimeout < 0 || o.FirstBackoff < 0 ||
		o.MaxBackoff < 0 || o.MaxAttempts < 0 || o.MaxBatch < 0 || o.Linger < 0 || o.MaxQueued < 0 {
		return o, errors.New("negative option")
	}
	def := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.RequestTimeout, DefaultRequestTimeout)
	def(&o.ConnectTimeout, DefaultConnectTimeout)
	def(&o.FirstBackoff, DefaultFirstBackoff)
	def(&o.MaxBackoff, DefaultMaxBackoff)
	if o.Workers == 0 {
		o.Workers = DefaultWorkers
	}
	if o.MaxAttempts == 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	if o.MaxBatch == 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.Encode == nil {
		o.Encode = webhook.EncodeBody
	}
	return o, nil
}

// Stats is a snapshot of the queue's counters. Impression counts are of
// impressions; task counts are of POST bodies.
type Stats struct {
	// Submitted impressions were accepted by Submit.
	Submitted int64 `json:"submitted"`
	// Delivered impressions were in a POST answered 2xx.
	Delivered int64 `json:"delivered"`
	// Exhausted impressions were dropped after MaxAttempts failed attempts.
	Exhausted int64 `json:"exhausted"`
	// Refused impressions were refused by Submit with ErrFull.
	Refused int64 `json:"refused"`
	// Held impressions are lingering, queued, in flight or waiting to retry.
	Held int64 `json:"held"`
	// QueueDepth is the number of tasks in the FIFO now.
	QueueDepth int `json:"queue_depth"`
	// MaxQueueDepth is the largest QueueDepth seen.
	MaxQueueDepth int `json:"max_queue_depth"`
	// OldestQueued is how long ago the impressions of the task at the head
	// of the FIFO were submitted (0 when empty).
	OldestQueued time.Duration `json:"oldest_queued_ns"`
	// Waiting is the number of tasks in backoff, not in the FIFO.
	Waiting int `json:"waiting"`
	// InFlight is the number of POSTs under way (at most Workers).
	InFlight int `json:"in_flight"`
	// Attempts is the number of POSTs started.
	Attempts int64 `json:"attempts"`
	// Failures is the number of attempts that did not get a 2xx; it is the
	// sum of the three counters below it.
	Failures int64 `json:"failures"`
	// Timeouts hit RequestTimeout or ConnectTimeout.
	Timeouts int64 `json:"timeouts"`
	// Status got a non-2xx answer.
	Status int64 `json:"status"`
	// Transport failed otherwise (refused, reset, ...).
	Transport int64 `json:"transport"`
}

// task is one batch for one destination.
type task struct {
	dest      string
	id        string
	body      []byte
	n         int
	submitted time.Time // when the batch's first impression was submitted
	attempts  int
}

// lingering is a destination's partial batch waiting for more impressions.
type lingering struct {
	items     []*ingestv1.Impression
	submitted time.Time
	timer     *time.Timer
}

// Queue is the shared FIFO and its worker pool; Model states exactly what it
// models and what it leaves out. Its methods are safe for concurrent use.
type Queue struct {
	opts   Options
	client *http.Client
	tr     *http.Transport
	seq    atomic.Uint64
	wg     sync.WaitGroup // workers

	// mu guards everything below; cond signals workers when fifo grows or
	// the queue closes.
	mu       sync.Mutex
	cond     *sync.Cond
	closed   bool
	fifo     []*task // fifo[head:] are queued, oldest first
	head     int
	maxDepth int
	linger   map[string]*lingering
	waiting  map[*task]*time.Timer
	inFlight int
	held     int64
	// aborts cancels the POSTs in flight; Close calls them all.
	aborts map[*context.CancelFunc]struct{}

	submitted, delivered, exhausted, refused      atomic.Int64
	attempts, failures, timeouts, status, transpt atomic.Int64
}

// New starts a Queue with its workers.
func New(opts Options) (*Queue, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("new shared queue: %w", err)
	}
	dialer := &net.Dialer{Timeout: o.ConnectTimeout, Control: loopbackOnly}
	tr := &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: o.Workers,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	q := &Queue{
		opts:    o,
		tr:      tr,
		client:  &http.Client{Transport: tr},
		linger:  make(map[string]*lingering),
		waiting: make(map[*task]*time.Timer),
		aborts:  make(map[*context.CancelFunc]struct{}),
	}
	q.cond = sync.NewCond(&q.mu)
	q.wg.Add(o.Workers)
	for range o.Workers {
		go q.work()
	}
	return q, nil
}

// Submit hands impressions for the destination at url to the queue. It never
// blocks on delivery: the impressions join the destination's lingering batch
// or become tasks at the tail of the shared FIFO at once. It returns ErrClosed
// after Close or ErrFull past Options.MaxQueued, accepting nothing. An
// encoding error (only a custom Options.Encode can fail) drops that batch,
// counts it in Stats.Exhausted and is returned. The queue keeps item pointers
// only until their batch is encoded.
func (q *Queue) Submit(url string, items []*ingestv1.Impression) error {
	if len(items) == 0 {
		return nil
	}
	now := time.Now()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return fmt.Errorf("submit to %s: %w", url, ErrClosed)
	}
	n := int64(len(items))
	if q.opts.MaxQueued > 0 && q.held+n > q.opts.MaxQueued {
		q.mu.Unlock()
		q.refused.Add(n)
		return fmt.Errorf("submit %d to %s: %w", n, url, ErrFull)
	}
	q.held += n
	q.submitted.Add(n)
	ready, submitted := items, now
	if q.opts.Linger > 0 {
		ready, submitted = q.lingerLocked(url, items, now)
	}
	q.mu.Unlock()
	if err := q.enqueue(url, ready, submitted); err != nil {
		return fmt.Errorf("submit to %s: %w", url, err)
	}
	return nil
}

// lingerLocked adds items to url's lingering batch and returns the
// impressions that now fill whole batches, with the time the oldest of them
// was submitted. The remainder keeps lingering; its timer runs from its first
// impression's submission. q.mu must be held.
func (q *Queue) lingerLocked(url string, items []*ingestv1.Impression, now time.Time) ([]*ingestv1.Impression, time.Time) {
	l := q.linger[url]
	if l == nil {
		l = &lingering{submitted: now}
		q.linger[url] = l
		l.timer = time.AfterFunc(q.opts.Linger, func() { q.flush(url, l) })
	}
	l.items = append(l.items, items...)
	full := len(l.items) - len(l.items)%q.opts.MaxBatch
	if full == 0 {
		return nil, now
	}
	// The returned prefix is never appended to again: the remainder moves
	// to a new slice.
	ready := l.items[:full]
	l.items = append([]*ingestv1.Impression(nil), l.items[full:]...)
	if len(l.items) == 0 {
		l.timer.Stop()
		delete(q.linger, url)
	}
	return ready, l.submitted
}

// flush enqueues l, a lingering batch for url, when its linger elapses.
func (q *Queue) flush(url string, l *lingering) {
	q.mu.Lock()
	if q.closed || q.linger[url] != l {
		q.mu.Unlock()
		return
	}
	delete(q.linger, url)
	q.mu.Unlock()
	// Only a custom Encode can fail; enqueue counts the batch as exhausted.
	_ = q.enqueue(url, l.items, l.submitted)
}

// enqueue encodes items in batches of at most MaxBatch, without holding
// q.mu, and puts them at the tail of the FIFO. After Close the batches are
// abandoned (still counted as held).
func (q *Queue) enqueue(url string, items []*ingestv1.Impression, submitted time.Time) error {
	var tasks []*task
	var errs []error
	lost := 0
	for start := 0; start < len(items); start += q.opts.MaxBatch {
		batch := items[start:min(start+q.opts.MaxBatch, len(items))]
		body, err := q.encode(batch)
		if err != nil {
			errs = append(errs, err)
			lost += len(batch)
			continue
		}
		tasks = append(tasks, &task{
			dest:      url,
			id:        "sq_" + strconv.FormatUint(q.seq.Add(1), 10),
			body:      body,
			n:         len(batch),
			submitted: submitted,
		})
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if lost > 0 {
		q.held -= int64(lost)
		q.exhausted.Add(int64(lost))
	}
	if !q.closed {
		for _, t := range tasks {
			q.pushLocked(t)
		}
	}
	return errors.Join(errs...)
}

func (q *Queue) encode(batch []*ingestv1.Impression) ([]byte, error) {
	body, err := q.opts.Encode(batch)
	if err != nil {
		return nil, fmt.Errorf("encode batch: %w", err)
	}
	if !q.opts.Gzip {
		return body, nil
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(body); err != nil {
		return nil, fmt.Errorf("gzip batch: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("gzip batch: %w", err)
	}
	return buf.Bytes(), nil
}

// pushLocked appends t to the FIFO's tail and wakes a worker.
// q.mu must be held.
func (q *Queue) pushLocked(t *task) {
	// Reclaim the consumed prefix once it dominates, keeping pops O(1)
	// amortised without a ring buffer.
	if q.head > 1024 && q.head*2 > len(q.fifo) {
		n := copy(q.fifo, q.fifo[q.head:])
		clear(q.fifo[n:])
		q.fifo = q.fifo[:n]
		q.head = 0
	}
	q.fifo = append(q.fifo, t)
	q.maxDepth = max(q.maxDepth, len(q.fifo)-q.head)
	q.cond.Signal()
}

// pop waits for the FIFO's head task; false means the queue closed.
func (q *Queue) pop() (*task, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for !q.closed && q.head == len(q.fifo) {
		q.cond.Wait()
	}
	if q.closed {
		return nil, false
	}
	t := q.fifo[q.head]
	q.fifo[q.head] = nil
	q.head++
	q.inFlight++
	return t, true
}

// work is one worker: take the head task, POST it, account for the result.
func (q *Queue) work() {
	defer q.wg.Done()
	for {
		t, ok := q.pop()
		if !ok {
			return
		}
		t.attempts++
		err := q.post(t)
		q.mu.Lock()
		q.inFlight--
		switch {
		case err == nil:
			q.held -= int64(t.n)
			q.delivered.Add(int64(t.n))
		case q.closed:
			// Aborted by Close: the task is abandoned with the rest.
		case t.attempts >= q.opts.MaxAttempts:
			q.held -= int64(t.n)
			q.exhausted.Add(int64(t.n))
		default:
			q.retryLocked(t)
		}
		q.mu.Unlock()
	}
}

// retryLocked re-enqueues t at the FIFO's tail after its backoff, holding a
// timer, not a worker. q.mu must be held.
func (q *Queue) retryLocked(t *task) {
	wait := q.opts.FirstBackoff << (t.attempts - 1)
	if wait > q.opts.MaxBackoff || wait <= 0 {
		wait = q.opts.MaxBackoff
	}
	q.waiting[t] = time.AfterFunc(wait, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if q.closed {
			return
		}
		delete(q.waiting, t)
		q.pushLocked(t)
	})
}

// post makes one delivery attempt of t; nil means a 2xx.
func (q *Queue) post(t *task) error {
	q.attempts.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), q.opts.RequestTimeout)
	defer cancel()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return context.Canceled
	}
	q.aborts[&cancel] = struct{}{}
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		delete(q.aborts, &cancel)
		q.mu.Unlock()
	}()
	err := q.send(ctx, t)
	if err == nil {
		return nil
	}
	q.failures.Add(1)
	var se *statusError
	switch {
	case errors.As(err, &se):
		q.status.Add(1)
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		q.timeouts.Add(1)
	default:
		q.transpt.Add(1)
	}
	return err
}

// loopbackOnly is a net.Dialer Control that refuses, before connecting, any
// address that is not a loopback IP.
func loopbackOnly(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return fmt.Errorf("dial %s: %w", address, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("dial %s: %w", address, ErrNotLoopback)
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// statusError is a non-2xx answer.
type statusError struct{ code int }

func (e *statusError) Error() string { return "status " + strconv.Itoa(e.code) }

func (q *Queue) send(ctx context.Context, t *task) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.dest, bytes.NewReader(t.body))
	if err != nil {
		return fmt.Errorf("post %s: %w", t.dest, err)
	}
	now := time.Now()
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(webhook.HeaderID, t.id)
	req.Header.Set(webhook.HeaderTimestamp, strconv.FormatInt(now.Unix(), 10))
	if q.opts.Gzip {
		req.Header.Set("Content-Encoding", "gzip")
	}
	if q.opts.Secret != nil {
		// The same Standard Webhooks signing code as the deliverer.
		req.Header.Set(webhook.HeaderSignature, webhook.Sign(q.opts.Secret, t.id, now, t.body))
	}
	resp, err := q.client.Do(req)
	if err != nil {
		return fmt.Errorf("post %s: %w", t.dest, err)
	}
	// Drain a little so the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("post %s: %w", t.dest, &statusError{resp.StatusCode})
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	s := Stats{
		Held:          q.held,
		QueueDepth:    len(q.fifo) - q.head,
		MaxQueueDepth: q.maxDepth,
		Waiting:       len(q.waiting),
		InFlight:      q.inFlight,
	}
	if q.head < len(q.fifo) {
		s.OldestQueued = time.Since(q.fifo[q.head].submitted)
	}
	q.mu.Unlock()
	s.Submitted = q.submitted.Load()
	s.Delivered = q.delivered.Load()
	s.Exhausted = q.exhausted.Load()
	s.Refused = q.refused.Load()
	s.Attempts = q.attempts.Load()
	s.Failures = q.failures.Load()
	s.Timeouts = q.timeouts.Load()
	s.Status = q.status.Load()
	s.Transport = q.transpt.Load()
	return s
}

// Close stops the queue: in-flight POSTs are aborted, lingering, queued and
// waiting tasks are abandoned (they stay counted in Stats.Held), and Close
// returns once every worker has stopped. Callers that want everything
// delivered wait for Stats().Held to reach 0 first. It is idempotent.
func (q *Queue) Close() {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.closed = true
	for _, l := range q.linger {
		l.timer.Stop()
	}
	for _, tm := range q.waiting {
		tm.Stop()
	}
	for abort := range q.aborts {
		(*abort)()
	}
	q.cond.Broadcast()
	q.mu.Unlock()
	q.wg.Wait()
	q.tr.CloseIdleConnections()
}
