package registry

import (
	"maps"
	"slices"
	"sync"
)

// Subscription delivers the registry's changes to one consumer, in order,
// without ever blocking the watch: changes queue until Take. It begins with
// the view as it was when Subscribe returned, one Change per destination
// and decision (each ordered by id), so a consumer builds its state from changes alone.
type Subscription struct {
	r     *Registry
	mu    sync.Mutex
	queue []Change
	ready chan struct{} // holds a token while queue is not empty
}

// Subscribe returns a subscription primed with the current view.
func (r *Registry) Subscribe() *Subscription {
	s := &Subscription{r: r, ready: make(chan struct{}, 1)}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(r.dests)) {
		s.push(Change{Kind: DestinationChanged, ID: id, Destination: r.dests[id]})
	}
	for _, id := range slices.Sorted(maps.Keys(r.decisions)) {
		s.push(Change{Kind: DecisionChanged, ID: id, Decision: r.decisions[id]})
	}
	r.subs[s] = struct{}{}
	return s
}

// Ready has a value whenever changes are waiting; then call Take.
func (s *Subscription) Ready() <-chan struct{} { return s.ready }

// Take returns the changes waiting, oldest first, and empties the queue.
func (s *Subscription) Take() []Change {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queue
	s.queue = nil
	return q
}

// Close ends the subscription; changes after it are not queued.
func (s *Subscription) Close() {
	s.r.mu.Lock()
	delete(s.r.subs, s)
	s.r.mu.Unlock()
}

func (s *Subscription) push(c Change) {
	s.mu.Lock()
	s.queue = append(s.queue, c)
	s.mu.Unlock()
	select {
	case s.ready <- struct{}{}:
	default:
	}
}
