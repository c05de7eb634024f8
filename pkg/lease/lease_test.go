package lease

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bulkhead-io/bulkhead/pkg/poll"
	"github.com/bulkhead-io/bulkhead/pkg/stream"
	"github.com/bulkhead-io/bulkhead/pkg/testkit"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type holders struct {
	mu   sync.Mutex
	held map[string]bool
}

func (h *holders) set(name string, v bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.held[name] = v
}

func (h *holders) current() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for n, v := range h.held {
		if v {
			out = append(out, n)
		}
	}
	return out
}

func TestOneHolderAndFailover(t *testing.T) {
	tk := testkit.JetStream(t, stream.Limits{})
	kv := tk.Leases
	ctx := context.Background()
	h := &holders{held: map[string]bool{}}
	cancels := map[string]context.CancelFunc{}
	var wg sync.WaitGroup
	for _, name := range []string{"a", "b", "c"} {
		cctx, cancel := context.WithCancel(ctx)
		cancels[name] = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			Run(cctx, kv, "monitor", name, 200*time.Millisecond, slog.New(slog.DiscardHandler), func(v bool) { h.set(name, v) })
		}()
	}
	t.Cleanup(func() {
		for _, c := range cancels {
			c()
		}
		wg.Wait()
	})
	var first string
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		cur := h.current()
		if len(cur) != 1 {
			return fmt.Errorf("holders = %v, want exactly one", cur)
		}
		first = cur[0]
		return nil
	})
	// Stay stable: still exactly one holder after several renewals.
	time.Sleep(time.Second) // observation window, not a synchronisation
	if cur := h.current(); len(cur) != 1 || cur[0] != first {
		t.Fatalf("holders changed without failure: %v (was %s)", cur, first)
	}
	cancels[first]()
	poll.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		cur := h.current()
		if len(cur) != 1 || cur[0] == first {
			return fmt.Errorf("holders = %v after %s stopped", cur, first)
		}
		return nil
	})
}
