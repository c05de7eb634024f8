package schedule

// link is an element's membership in a ring: its neighbours and its deficit,
// the impressions it may still send in the current round (negative when it
// sent a batch larger than its credit and owes the difference).
type link[E any] struct {
	prev, next E
	deficit    int
	linked     bool
}

// member is an element that can be in a ring: a lane (in its tenant's ring) or
// a tenant (in the scheduler's ring).
type member[E any] interface {
	comparable
	links() *link[E]
}

// ring is an intrusive circular list run as deficit round robin: each time an
// element comes to the head it is credited one quantum, and it stays the head
// while its deficit is positive. Every operation is O(1), and only elements
// that can send are in the ring, so a pick never scans idle or blocked ones.
// A ring is guarded by its Scheduler's mutex.
type ring[E member[E]] struct {
	head E
	n    int
	// credited reports whether head has had its quantum for the current visit.
	credited bool
}

// push links e at the tail, so it is visited last in the current round.
func (r *ring[E]) push(e E) {
	l := e.links()
	l.linked = true
	r.n++
	if r.n == 1 {
		r.head, l.prev, l.next, r.credited = e, e, e, false
		return
	}
	h := r.head.links()
	tail := h.prev
	l.prev, l.next = tail, r.head
	tail.links().next = e
	h.prev = e
}

// remove unlinks e if it is linked. A positive deficit is forfeited, as in
// DRR, so idle time cannot be banked for a later burst; a debt is kept, so
// that going idle right after an oversized batch does not forgive it.
func (r *ring[E]) remove(e E) {
	l := e.links()
	if !l.linked {
		return
	}
	var zero E
	r.n--
	if r.n == 0 {
		r.head = zero
	} else {
		l.prev.links().next = l.next
		l.next.links().prev = l.prev
		if r.head == e {
			r.head, r.credited = l.next, false
		}
	}
	l.prev, l.next, l.linked = zero, zero, false
	l.deficit = min(l.deficit, 0)
}

// rotate ends the head's visit.
func (r *ring[E]) rotate() {
	r.head, r.credited = r.head.links().next, false
}

// pick returns the element to serve: the first one, from the head on, whose
// deficit is positive once credited. The ring must not be empty. Every visit
// adds a quantum, so pick ends within as many rounds as the largest debt has
// quanta, which the scheduler bounds by capping costs.
func (r *ring[E]) pick(quantum int) E {
	for {
		l := r.head.links()
		if !r.credited {
			l.deficit += quantum
			r.credited = true
		}
		if l.deficit > 0 {
			return r.head
		}
		r.rotate()
	}
}

// settle ends e's visit if e is the head and has spent its credit. Call it
// after debiting e.
func (r *ring[E]) settle(e E) {
	l := e.links()
	if l.linked && r.head == e && l.deficit <= 0 {
		r.rotate()
	}
}

// fifo is a growable circular queue.
type fifo[E any] struct {
	buf  []E
	head int
	n    int
}

func (q *fifo[E]) len() int { return q.n }

func (q *fifo[E]) push(e E) {
	if q.n == len(q.buf) {
		buf := make([]E, max(4, 2*len(q.buf)))
		for i := range q.n {
			buf[i] = q.buf[(q.head+i)%len(q.buf)]
		}
		q.buf, q.head = buf, 0
	}
	q.buf[(q.head+q.n)%len(q.buf)] = e
	q.n++
}

// pop removes and returns the oldest element. The queue must not be empty.
func (q *fifo[E]) pop() E {
	var zero E
	e := q.buf[q.head]
	q.buf[q.head] = zero // let the item be collected
	q.head = (q.head + 1) % len(q.buf)
	q.n--
	return e
}
