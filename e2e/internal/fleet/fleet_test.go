package fleet

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/pkg/poll"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// start runs a fleet closed in t.Cleanup.
func start(t *testing.T, n int, opts Options) *Fleet {
	t.Helper()
	f, err := New(n, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return f
}

// client returns an HTTP client with its own transport, closed in t.Cleanup.
func client(t *testing.T, timeout time.Duration) *http.Client {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: timeout}
}

func body(keys ...string) []byte {
	var b strings.Builder
	b.WriteByte('[')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"key":%q,"split":"s","environmentId":"e","treatment":"on","time":1700000000000}`, k)
	}
	b.WriteByte(']')
	return []byte(b.String())
}

// post sends keys to url and returns the status code.
func post(c *http.Client, url, id string, gz bool, keys ...string) (int, http.Header, error) {
	b := body(keys...)
	if gz {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		if _, err := zw.Write(b); err != nil {
			return 0, nil, err
		}
		if err := zw.Close(); err != nil {
			return 0, nil, err
		}
		b = buf.Bytes()
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("webhook-id", id)
	if gz {
		req.Header.Set("Content-Encoding", "gzip")
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header, nil
}

func TestBehaviors(t *testing.T) {
	tests := []struct {
		b          Behavior
		timeout    time.Duration
		wantStatus int // 0: the request must fail
		wantErr    error
		arrives    bool
		check      func(Stats) error
		header     map[string]string
	}{
		{b: Healthy, timeout: 2 * time.Second, wantStatus: 200, arrives: true},
		{b: Hang, timeout: 200 * time.Millisecond, check: func(s Stats) error {
			if s.Hung != 1 || s.Dropped != 1 {
				return fmt.Errorf("hung %d dropped %d, want 1 1", s.Hung, s.Dropped)
			}
			return nil
		}},
		{b: Refused, timeout: 2 * time.Second, wantErr: syscall.ECONNREFUSED},
		{b: Status503, timeout: 2 * time.Second, wantStatus: 503},
		{b: SlowOK, timeout: 2 * time.Second, wantStatus: 200, arrives: true},
		{b: Throttled, timeout: 2 * time.Second, wantStatus: 429, header: map[string]string{"Retry-After": "1"}},
		{b: Flapping, timeout: 2 * time.Second, wantStatus: 503},
	}
	for _, tc := range tests {
		t.Run(tc.b.String(), func(t *testing.T) {
			f := start(t, 2, Options{SlowDelay: 150 * time.Millisecond, FlapPeriod: time.Minute})
			if err := f.Set(0, tc.b); err != nil {
				t.Fatalf("Set: %v", err)
			}
			c := client(t, tc.timeout)
			began := time.Now()
			status, h, err := post(c, f.URL(0), "msg-1", false, "a", "b")
			switch {
			case tc.wantStatus == 0 && err == nil:
				t.Fatalf("status %d, want an error", status)
			case tc.wantStatus == 0 && tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			case tc.wantStatus != 0 && err != nil:
				t.Fatalf("post: %v", err)
			case status != tc.wantStatus:
				t.Fatalf("status %d, want %d", status, tc.wantStatus)
			}
			for k, v := range tc.header {
				if got := h.Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			if tc.b == SlowOK && time.Since(began) < 150*time.Millisecond {
				t.Errorf("SlowOK answered after %v, want >= 150ms", time.Since(began))
			}
			if tc.check != nil {
				poll.CheckFor(t, 15*time.Second, 10*time.Millisecond, func() error { return tc.check(f.Stats(0)) })
			}
			arr := f.Drain()
			if !tc.arrives {
				if len(arr) != 0 {
					t.Fatalf("arrivals %v, want none", arr)
				}
				return
			}
			if len(arr) != 1 || arr[0].Endpoint != 0 || arr[0].WebhookID != "msg-1" ||
				strings.Join(arr[0].Keys, ",") != "a,b" || arr[0].At.Before(began) {
				t.Fatalf("arrivals %+v, want one at endpoint 0 with id msg-1 keys a,b", arr)
			}
			if s := f.Total(); s.OK != 1 || s.Impressions != 2 || f.Delivered() != 2 {
				t.Fatalf("stats %+v delivered %d, want 1 OK, 2 impressions", s, f.Delivered())
			}
		})
	}
}

func TestRefusedThenHealthySamePort(t *testing.T) {
	f := start(t, 1, Options{})
	c := client(t, 2*time.Second)
	url := f.URL(0)
	// Open a keep-alive connection first: Refused must not be served over it.
	if status, _, err := post(c, url, "1", false, "k1"); err != nil || status != 200 {
		t.Fatalf("healthy post: %d %v", status, err)
	}
	for round := range 3 {
		if err := f.Set(0, Refused); err != nil {
			t.Fatalf("round %d: Set Refused: %v", round, err)
		}
		if status, _, err := post(c, url, "2", false, "k2"); err == nil {
			t.Fatalf("round %d: refused endpoint answered %d", round, status)
		}
		if err := f.Set(0, Healthy); err != nil {
			t.Fatalf("round %d: Set Healthy: %v", round, err)
		}
		if f.URL(0) != url {
			t.Fatalf("URL changed: %s -> %s", url, f.URL(0))
		}
		if status, _, err := post(c, url, fmt.Sprint("h", round), false, fmt.Sprint("r", round)); err != nil || status != 200 {
			t.Fatalf("round %d: post after re-listen: %d %v", round, status, err)
		}
	}
	if got := f.Delivered(); got != 4 {
		t.Fatalf("delivered %d, want 4", got)
	}
}

func TestGzipAndDuplicates(t *testing.T) {
	f := start(t, 2, Options{})
	c := client(t, 2*time.Second)
	for i, gz := range []bool{false, true} {
		if status, _, err := post(c, f.URL(1), "same-id", gz, "x", "y", "z"); err != nil || status != 200 {
			t.Fatalf("post %d: %d %v", i, status, err)
		}
	}
	// The same keys at another endpoint are not duplicates.
	if status, _, err := post(c, f.URL(0), "same-id", false, "x"); err != nil || status != 200 {
		t.Fatalf("post: %d %v", status, err)
	}
	if s := f.Stats(1); s.Duplicates != 3 || s.DuplicateIDs != 1 || s.Impressions != 6 {
		t.Fatalf("endpoint 1 stats %+v, want 3 duplicates, 1 duplicate id, 6 impressions", s)
	}
	if s := f.Stats(0); s.Duplicates != 0 || s.DuplicateIDs != 0 {
		t.Fatalf("endpoint 0 stats %+v, want no duplicates", s)
	}
	arr := f.Drain()
	if len(arr) != 3 {
		t.Fatalf("%d arrivals, want 3", len(arr))
	}
	if len(f.Drain()) != 0 {
		t.Fatal("second Drain returned arrivals")
	}
}

func TestBadBody(t *testing.T) {
	f := start(t, 1, Options{MaxBody: 64})
	c := client(t, 2*time.Second)
	for _, tc := range []struct {
		name, body string
		want       int
	}{
		{"not json", "nope", 400},
		{"too large", strings.Repeat(" ", 100), 413},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := c.Post(f.URL(0), "application/json", strings.NewReader(tc.body))
			if err != nil {
				t.Fatalf("post: %v", err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.want)
			}
		})
	}
	if s := f.Stats(0); s.BadRequest != 2 || s.OK != 0 {
		t.Fatalf("stats %+v, want 2 bad requests", s)
	}
}

func TestFlappingAlternates(t *testing.T) {
	f := start(t, 1, Options{FlapPeriod: 100 * time.Millisecond})
	if err := f.Set(0, Flapping); err != nil {
		t.Fatal(err)
	}
	c := client(t, 2*time.Second)
	seen := map[int]bool{}
	poll.CheckFor(t, 3*time.Second, 20*time.Millisecond, func() error {
		status, _, err := post(c, f.URL(0), "f", false, "k")
		if err != nil {
			return err
		}
		seen[status] = true
		if !seen[200] || !seen[503] {
			return fmt.Errorf("seen %v, want 200 and 503", seen)
		}
		return nil
	})
}

func TestOnArrival(t *testing.T) {
	got := make(chan Arrival, 1)
	f := start(t, 1, Options{OnArrival: func(a Arrival) { got <- a }})
	c := client(t, 2*time.Second)
	if status, _, err := post(c, f.URL(0), "cb", false, "k"); err != nil || status != 200 {
		t.Fatalf("post: %d %v", status, err)
	}
	if a := <-got; a.WebhookID != "cb" || len(a.Keys) != 1 {
		t.Fatalf("arrival %+v", a)
	}
	if len(f.Drain()) != 0 {
		t.Fatal("Drain returned arrivals with OnArrival set")
	}
}

func TestCloseReleasesHang(t *testing.T) {
	f, err := New(1, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Set(0, Hang); err != nil {
		t.Fatal(err)
	}
	c := client(t, 10*time.Second)
	errc := make(chan error, 1)
	go func() {
		_, _, err := post(c, f.URL(0), "h", false, "k")
		errc <- err
	}()
	poll.CheckFor(t, 15*time.Second, 10*time.Millisecond, func() error {
		if f.Stats(0).Hung != 1 {
			return errors.New("request not hung yet")
		}
		return nil
	})
	began := time.Now()
	if err := f.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-errc; err == nil {
		t.Fatal("hung request got an answer")
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Fatalf("Close took %v", d)
	}
	if err := f.Set(0, Healthy); !errors.Is(err, ErrClosed) {
		t.Fatalf("Set after Close: %v, want ErrClosed", err)
	}
}

func TestNewErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		opts Options
	}{
		{"zero endpoints", 0, Options{}},
		{"negative delay", 1, Options{SlowDelay: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if f, err := New(tc.n, tc.opts); err == nil {
				_ = f.Close()
				t.Fatal("New succeeded")
			}
		})
	}
	f := start(t, 1, Options{})
	if err := f.Set(1, Healthy); !errors.Is(err, ErrNoEndpoint) {
		t.Fatalf("Set(1): %v, want ErrNoEndpoint", err)
	}
	if err := f.Set(0, Behavior(99)); !errors.Is(err, ErrBehavior) {
		t.Fatalf("Set(99): %v, want ErrBehavior", err)
	}
}

// BenchmarkHealthy measures the receiving side's cost per 100-impression POST.
func BenchmarkHealthy(b *testing.B) {
	f, err := New(1, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	keys := make([]string, 100)
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	n := 0
	for b.Loop() {
		for i := range keys {
			keys[i] = fmt.Sprint(n)
			n++
		}
		if status, _, err := post(c, f.URL(0), "id", false, keys...); err != nil || status != 200 {
			b.Fatalf("post: %d %v", status, err)
		}
		f.Drain()
	}
}
