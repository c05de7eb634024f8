package sharedqueue

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/e2e/internal/fleet"
	ingestv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/ingest/v1"
	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// imps returns n impressions of a realistic size keyed prefix-0 .. prefix-(n-1).
func imps(prefix string, n int) []*ingestv1.Impression {
	return testkit.Impressions(prefix, n, testkit.Full)
}

func startFleet(t *testing.T, n int) *fleet.Fleet {
	t.Helper()
	f, err := fleet.New(n, fleet.Options{})
	if err != nil {
		t.Fatalf("fleet: %v", err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("close fleet: %v", err)
		}
	})
	return f
}

func startQueue(t *testing.T, opts Options) *Queue {
	t.Helper()
	q, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(q.Close)
	return q
}

func TestHealthyEverythingArrives(t *testing.T) {
	f := startFleet(t, 4)
	q := startQueue(t, Options{Workers: 4})
	const rounds, per = 20, 10
	for r := range rounds {
		for d := range f.Len() {
			if err := q.Submit(f.URL(d), imps(fmt.Sprintf("r%d-d%d", r, d), per)); err != nil {
				t.Fatalf("Submit: %v", err)
			}
		}
	}
	want := int64(rounds * per * f.Len())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.WaitDelivered(ctx, want, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 15*time.Second, 5*time.Millisecond, func() error {
		if s := q.Stats(); s.Delivered != want || s.Held != 0 || s.Failures != 0 || s.Submitted != want {
			return fmt.Errorf("stats %+v, want %d delivered, none held or failed", s, want)
		}
		return nil
	})
	if s := f.Total(); s.Duplicates != 0 || s.OK != int64(rounds*f.Len()) {
		t.Fatalf("fleet %+v, want %d OK requests without duplicates", s, rounds*f.Len())
	}
	keys := map[string]bool{}
	for _, a := range f.Drain() {
		for _, k := range a.Keys {
			keys[k] = true
		}
	}
	if len(keys) != int(want) {
		t.Fatalf("%d distinct keys arrived, want %d", len(keys), want)
	}
}

func TestWireFormat(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	type got struct {
		header http.Header
		raw    []byte
		body   []map[string]any
		err    error
	}
	gotc := make(chan got, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g := got{header: r.Header.Clone()}
		var err error
		if g.raw, err = io.ReadAll(r.Body); err == nil {
			var zr *gzip.Reader
			if zr, err = gzip.NewReader(bytes.NewReader(g.raw)); err == nil {
				var plain []byte
				if plain, err = io.ReadAll(zr); err == nil {
					err = json.Unmarshal(plain, &g.body)
				}
			}
		}
		g.err = err
		gotc <- g
	}))
	defer srv.Close()
	q := startQueue(t, Options{Workers: 1, Gzip: true, Secret: secret})
	if err := q.Submit(srv.URL, imps("w", 2)); err != nil {
		t.Fatal(err)
	}
	g := <-gotc
	if g.err != nil {
		t.Fatalf("decode body: %v", g.err)
	}
	if len(g.body) != 2 || g.body[1]["key"] != "w-1" || g.body[0]["time"] != 1700000000000.0 ||
		g.body[0]["machineIp"] != "10.0.0.7" || g.body[0]["environmentId"] != "env-1" {
		t.Fatalf("body %v", g.body)
	}
	id, ts := g.header.Get("webhook-id"), g.header.Get("webhook-timestamp")
	if id == "" || ts == "" || g.header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("headers %v", g.header)
	}
	// The signature covers the body bytes as sent (here gzipped).
	if err := webhook.Verify([][]byte{secret}, g.header, g.raw, time.Minute, time.Now()); err != nil {
		t.Fatalf("signature: %v", err)
	}
}

func TestLingerMergesPerDestination(t *testing.T) {
	f := startFleet(t, 1)
	q := startQueue(t, Options{Workers: 2, MaxBatch: 25, Linger: 100 * time.Millisecond})
	for i := range 10 {
		if err := q.Submit(f.URL(0), imps(fmt.Sprint("m", i), 10)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := f.WaitDelivered(ctx, 100, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	for _, a := range f.Drain() {
		if len(a.Keys) > 25 {
			t.Fatalf("a POST carried %d impressions, want <= 25", len(a.Keys))
		}
	}
	if ok := f.Total().OK; ok > 5 {
		t.Fatalf("%d POSTs for 100 impressions in batches of 25", ok)
	}
	began := time.Now()
	if err := q.Submit(f.URL(0), imps("tail", 3)); err != nil {
		t.Fatal(err)
	}
	if err := f.WaitDelivered(ctx, 103, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	arr := f.Drain()
	if last := arr[len(arr)-1]; len(last.Keys) != 3 || last.At.Sub(began) < 100*time.Millisecond {
		t.Fatalf("partial batch %d keys after %v, want 3 after >= 100ms", len(last.Keys), last.At.Sub(began))
	}
}

func TestRetriesAtTailThenExhausts(t *testing.T) {
	f := startFleet(t, 1)
	if err := f.Set(0, fleet.Status503); err != nil {
		t.Fatal(err)
	}
	q := startQueue(t, Options{Workers: 2, FirstBackoff: 10 * time.Millisecond, MaxAttempts: 3})
	if err := q.Submit(f.URL(0), imps("x", 7)); err != nil {
		t.Fatal(err)
	}
	poll.CheckFor(t, 15*time.Second, 5*time.Millisecond, func() error {
		if s := q.Stats(); s.Exhausted != 7 || s.Held != 0 || s.Attempts != 3 || s.Status != 3 || s.Waiting != 0 {
			return fmt.Errorf("stats %+v, want 7 exhausted after 3 attempts", s)
		}
		return nil
	})
	if got := f.Stats(0).Status503; got != 3 {
		t.Fatalf("fleet saw %d 503s, want 3", got)
	}
}

func TestSubmitRefusals(t *testing.T) {
	f := startFleet(t, 1)
	if err := f.Set(0, fleet.Hang); err != nil {
		t.Fatal(err)
	}
	q, err := New(Options{Workers: 1, MaxQueued: 10})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Submit(f.URL(0), imps("a", 10)); err != nil {
		t.Fatalf("Submit within MaxQueued: %v", err)
	}
	if err := q.Submit(f.URL(0), imps("b", 1)); !errors.Is(err, ErrFull) {
		t.Fatalf("Submit past MaxQueued: %v, want ErrFull", err)
	}
	began := time.Now()
	q.Close()
	if d := time.Since(began); d > 2*time.Second {
		t.Fatalf("Close with a hung POST took %v", d)
	}
	if err := q.Submit(f.URL(0), imps("c", 1)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close: %v, want ErrClosed", err)
	}
	if s := q.Stats(); s.Refused != 1 || s.Submitted != 10 {
		t.Fatalf("stats %+v", s)
	}
}

func TestLoopbackOnly(t *testing.T) {
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:80", true},
		{"127.9.9.9:80", true},
		{"[::1]:80", true},
		{"192.0.2.1:80", false},
		{"[2001:db8::1]:80", false},
		{"nonsense", false},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			if err := loopbackOnly("tcp", tc.addr, nil); (err == nil) != tc.ok {
				t.Fatalf("loopbackOnly(%s) = %v, want ok=%v", tc.addr, err, tc.ok)
			}
		})
	}
}

// healthyLatencies runs an open-loop schedule against 4 endpoints, the last
// two set to failing, and returns the sorted latencies of impressions sent to
// the first two.
func healthyLatencies(t *testing.T, failing fleet.Behavior) []time.Duration {
	t.Helper()
	f := startFleet(t, 4)
	for _, i := range []int{2, 3} {
		if err := f.Set(i, failing); err != nil {
			t.Fatal(err)
		}
	}
	q, err := New(Options{
		Workers:        2,
		RequestTimeout: 200 * time.Millisecond,
		FirstBackoff:   100 * time.Millisecond,
		MaxAttempts:    2,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()

	const ticks, per = 10, 5
	submitted := map[string]time.Time{}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for r := range ticks {
		for d := range f.Len() {
			batch := imps(fmt.Sprintf("t%d-d%d", r, d), per)
			now := time.Now()
			if err := q.Submit(f.URL(d), batch); err != nil {
				t.Fatal(err)
			}
			if d < 2 {
				for _, im := range batch {
					submitted[im.GetKey()] = now
				}
			}
		}
		<-tick.C
	}
	poll.CheckFor(t, 15*time.Second, 5*time.Millisecond, func() error {
		if got := f.Stats(0).Impressions + f.Stats(1).Impressions; got < int64(len(submitted)) {
			return fmt.Errorf("%d of %d healthy impressions delivered", got, len(submitted))
		}
		return nil
	})
	var lat []time.Duration
	for _, a := range f.Drain() {
		if a.Endpoint >= 2 {
			continue
		}
		for _, k := range a.Keys {
			lat = append(lat, a.At.Sub(submitted[k]))
		}
	}
	slices.Sort(lat)
	return lat
}

// TestFailingDestinationsDelayHealthyOnes reproduces the incident: with half
// of the destinations hanging and a small shared pool, healthy destinations'
// latency grows far above the no-failure case.
func TestFailingDestinationsDelayHealthyOnes(t *testing.T) {
	base := healthyLatencies(t, fleet.Healthy)
	hang := healthyLatencies(t, fleet.Hang)
	baseP50, hangP50 := base[len(base)/2], hang[len(hang)/2]
	t.Logf("healthy destinations: p50 %v max %v without failures, p50 %v max %v with 2 of 4 hanging",
		baseP50, base[len(base)-1], hangP50, hang[len(hang)-1])
	if hangP50 < 100*time.Millisecond || hangP50 < 10*baseP50 {
		t.Fatalf("p50 with hanging destinations %v, want >= 100ms and >= 10x %v", hangP50, baseP50)
	}
}
