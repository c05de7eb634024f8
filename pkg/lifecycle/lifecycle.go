// Package lifecycle is the one owner of Bulkhead's background work. A Group
// starts goroutines and timers only while it is open and joins every one of
// them; Start runs a component and gives back a handle whose Stop returns only
// once the component has; Every drives a loop whose body tests call directly.
// No goroutine outlives the component that started it.
package lifecycle

import (
	"context"
	"sync"
	"time"
)

// Group owns goroutines and timers. The zero Group is open and ready.
type Group struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
	timers map[*time.Timer]struct{}
}

// Go runs f in a goroutine owned by g and reports true, or reports false
// and does not run f once Close has been called.
func (g *Group) Go(f func()) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1) // under mu: Wait cannot have begun for a closed group
	go func() {
		defer g.wg.Done()
		f()
	}()
	return true
}

// AfterFunc runs f in a goroutine owned by g once d has passed, unless g is
// closed first, in which case f never runs. It reports false, and does
// nothing, when g is already closed. Callers use it for retry timers: work
// that waits without holding a goroutine, and that shutdown cancels.
func (g *Group) AfterFunc(d time.Duration, f func()) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	if g.timers == nil {
		g.timers = map[*time.Timer]struct{}{}
	}
	g.wg.Add(1)
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		defer g.wg.Done()
		g.mu.Lock()
		_, pending := g.timers[t]
		delete(g.timers, t)
		g.mu.Unlock()
		if pending { // Close stops and forgets timers it cancels
			f()
		}
	})
	g.timers[t] = struct{}{}
	return true
}

// Close refuses new goroutines and timers and cancels the timers that have
// not fired. It may be called more than once.
func (g *Group) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	for t := range g.timers {
		if t.Stop() {
			g.wg.Done() // its callback will never run
		}
		delete(g.timers, t)
	}
}

// Closed reports whether Close has been called.
func (g *Group) Closed() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closed
}

// Wait returns once every goroutine and fired timer of g has returned.
func (g *Group) Wait() { g.wg.Wait() }

// Stop closes g and waits for everything it owns.
func (g *Group) Stop() {
	g.Close()
	g.Wait()
}

// Handle is a running component started with Start.
type Handle struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// Start runs run(ctx) in its own goroutine with a context that Stop cancels.
func Start(ctx context.Context, run func(context.Context) error) *Handle {
	ctx, cancel := context.WithCancel(ctx)
	h := &Handle{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		h.err = run(ctx)
	}()
	return h
}

// Stop cancels the component and returns its error once it has returned.
func (h *Handle) Stop() error {
	h.cancel()
	<-h.done
	return h.err
}

// Done is closed once the component has returned (by itself or by Stop).
func (h *Handle) Done() <-chan struct{} { return h.done }

// Err is the component's error; valid once Done is closed.
func (h *Handle) Err() error { return h.err }

// Every calls step every interval until ctx ends; step gets ctx. The loop
// body is a plain function so tests call it directly, without timers.
func Every(ctx context.Context, interval time.Duration, step func(context.Context)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			step(ctx)
		}
	}
}

// Backoff is the wait before retry number attempt (0 for the first): first,
// doubling with each attempt, never above ceiling.
func Backoff(attempt int, first, ceiling time.Duration) time.Duration {
	d := first
	for i := 0; i < attempt && d < ceiling; i++ {
		d *= 2
	}
	return min(d, ceiling)
}

// Sleep waits for d and reports whether ctx is still live; it returns
// false at once when ctx ends first.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
