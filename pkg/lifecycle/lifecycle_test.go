package lifecycle

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestGroupJoinsEverythingAndRefusesAfterClose(t *testing.T) {
	var g Group
	release := make(chan struct{})
	var ran atomic.Int32
	for range 10 {
		if !g.Go(func() { <-release; ran.Add(1) }) {
			t.Fatal("Go refused on an open group")
		}
	}
	g.Close()
	if g.Go(func() { ran.Add(100) }) {
		t.Fatal("Go accepted after Close")
	}
	if g.AfterFunc(time.Millisecond, func() { ran.Add(100) }) {
		t.Fatal("AfterFunc accepted after Close")
	}
	waited := make(chan struct{})
	go func() { g.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("Wait returned while goroutines were running")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	<-waited
	if got := ran.Load(); got != 10 {
		t.Fatalf("ran %d, want 10", got)
	}
}

func TestCloseCancelsPendingTimers(t *testing.T) {
	var g Group
	var fired atomic.Int32
	for range 5 {
		g.AfterFunc(time.Hour, func() { fired.Add(1) })
	}
	g.AfterFunc(time.Millisecond, func() { fired.Add(10) })
	time.Sleep(50 * time.Millisecond)
	done := make(chan struct{})
	go func() { g.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop waited for timers it should have cancelled")
	}
	if got := fired.Load(); got != 10 {
		t.Fatalf("fired %d, want only the 1 ms timer (10)", got)
	}
}

// TestConcurrentGoAndStop races starters against Stop: Wait must never
// return while a goroutine it accepted is still running.
func TestConcurrentGoAndStop(t *testing.T) {
	for range 50 {
		var g Group
		var running atomic.Int32
		var starters sync.WaitGroup
		for range 8 {
			starters.Add(1)
			go func() {
				defer starters.Done()
				for range 20 {
					g.Go(func() {
						running.Add(1)
						time.Sleep(time.Microsecond)
						running.Add(-1)
					})
					g.AfterFunc(time.Microsecond, func() {
						running.Add(1)
						running.Add(-1)
					})
				}
			}()
		}
		g.Stop()
		if n := running.Load(); n != 0 {
			t.Fatalf("%d goroutines still running after Stop", n)
		}
		starters.Wait()
		g.Wait()
	}
}

func TestHandleStopWaitsForTheComponent(t *testing.T) {
	errStopped := errors.New("stopped")
	var returned atomic.Bool
	h := Start(context.Background(), func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond)
		returned.Store(true)
		return errStopped
	})
	if err := h.Stop(); !errors.Is(err, errStopped) || !returned.Load() {
		t.Fatalf("Stop = %v, returned %v", err, returned.Load())
	}
	<-h.Done()
}

func TestEveryRunsStepUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		Every(ctx, time.Millisecond, func(context.Context) {
			if n.Add(1) == 5 {
				cancel()
			}
		})
	}()
	<-done
	if n.Load() < 5 {
		t.Fatalf("step ran %d times", n.Load())
	}
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep on a cancelled context reported live")
	}
}

func TestBackoffDoublesToItsCeiling(t *testing.T) {
	var got []time.Duration
	for a := range 7 {
		got = append(got, Backoff(a, 100*time.Millisecond, time.Second))
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("Backoff = %v, want %v ms", got, want)
		}
	}
}
