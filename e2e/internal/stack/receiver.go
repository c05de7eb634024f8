package stack

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

// Receiver is a real HTTP webhook endpoint that verifies signatures and
// records what it was sent. Status sets its answer; 0 means 200.
type Receiver struct {
	Server *httptest.Server
	Status atomic.Int32
	// Hang makes it accept requests and never answer (until Close).
	Hang atomic.Bool
	// Delay, in nanoseconds, is how long it takes to answer (a slow 2xx).
	Delay atomic.Int64

	mu       sync.Mutex
	secrets  [][]byte
	keys     map[string]int
	items    []webhook.Item
	ids      map[string]int
	requests int
	badSigs  int
	badBody  int
	gzipped  int
	release  chan struct{}
}

// NewReceiver starts a receiver on loopback.
func NewReceiver() *Receiver {
	r := &Receiver{keys: map[string]int{}, ids: map[string]int{}, release: make(chan struct{})}
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	return r
}

// URL is the receiver's address.
func (r *Receiver) URL() string { return r.Server.URL + "/hook" }

// SetSecret sets the secret signatures are verified with.
func (r *Receiver) SetSecret(s string) error {
	k, err := webhook.ParseSecret(s)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.secrets = [][]byte{k}
	r.mu.Unlock()
	return nil
}

func (r *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	data, err := webhook.ReadBody(req, 64<<20)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	gz := req.Header.Get("Content-Encoding") == "gzip"
	if r.Hang.Load() {
		select {
		case <-r.release:
		case <-req.Context().Done():
		}
		return
	}
	if d := time.Duration(r.Delay.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-r.release:
		case <-req.Context().Done():
			return
		}
	}
	status := int(r.Status.Load())
	if status == 0 {
		status = http.StatusOK
	}
	r.mu.Lock()
	r.requests++
	if gz {
		r.gzipped++
	}
	if status >= 200 && status < 300 {
		if len(r.secrets) > 0 && webhook.Verify(r.secrets, req.Header, data, time.Minute, time.Now()) != nil {
			r.badSigs++
		}
		items, err := webhook.DecodeBody(data)
		if err != nil {
			r.badBody++
		}
		for _, it := range items {
			r.keys[it.Key]++
		}
		r.items = append(r.items, items...)
		r.ids[req.Header.Get(webhook.HeaderID)]++
	}
	r.mu.Unlock()
	w.WriteHeader(status)
}

// Snapshot is what a receiver saw.
type Snapshot struct {
	Keys          map[string]int
	Items         []webhook.Item
	Requests      int
	BadSignatures int
	BadBodies     int
	Gzipped       int
	WebhookIDs    int
}

// Snapshot copies what the receiver has recorded.
func (r *Receiver) Snapshot() Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	keys := make(map[string]int, len(r.keys))
	for k, v := range r.keys {
		keys[k] = v
	}
	return Snapshot{Keys: keys, Items: append([]webhook.Item(nil), r.items...), Requests: r.requests,
		BadSignatures: r.badSigs, BadBodies: r.badBody, Gzipped: r.gzipped, WebhookIDs: len(r.ids)}
}

// Distinct is the number of distinct impression keys received.
func (r *Receiver) Distinct() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.keys)
}

// Close releases hanging requests and stops the server.
func (r *Receiver) Close() {
	close(r.release)
	r.Server.CloseClientConnections()
	r.Server.Close()
}
