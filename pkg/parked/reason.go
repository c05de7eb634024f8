package parked

import "fmt"

// Class is the kind of reason a batch is parked for: a typed value the
// code switches on and metrics use as a label, never a string matched by
// prefix.
type Class int

// The classes. The first four are holds: the destination must not receive
// traffic now, and its batches are replayed once it may again. The others
// are the batch's own fate.
const (
	Quarantined Class = iota + 1 // the monitor holds the destination (quarantined or probing)
	Paused                       // an operator paused it
	Disabled                     // disabled (by an operator, or by a 410 Gone)
	Deleted                      // deleted while batches were waiting
	NoSecret                     // its signing secret is unusable
	Rejected                     // the endpoint refused the batch (a permanent 4xx)
	Exhausted                    // retries ran out
	Unencodable                  // the batch could not be turned into a body
	OverBudget                   // its destination's DELIVERY backlog was at its budget
)

var classNames = map[Class]string{
	Quarantined: "quarantined", Paused: "paused", Disabled: "destination disabled", Deleted: "destination deleted",
	NoSecret: "destination has no usable secret", Rejected: "rejected", Exhausted: "retries exhausted", Unencodable: "unencodable",
	OverBudget: "delivery backlog over budget",
}

// String is the class's name: the metric label, and the whole stored reason
// of a hold.
func (c Class) String() string {
	if n, ok := classNames[c]; ok {
		return n
	}
	return "unknown"
}

// Hold reports whether c holds the destination (as opposed to a batch's
// own failure).
func (c Class) Hold() bool { return c >= Quarantined && c <= NoSecret }

// Reason is why a batch is parked: its class and, for a batch's own
// failure, what happened.
type Reason struct {
	Class  Class
	Detail string
}

// Because returns the reason of class c with a formatted detail.
func Because(c Class, format string, args ...any) Reason {
	return Reason{Class: c, Detail: fmt.Sprintf(format, args...)}
}

// String is the text stored with the parked batch (park_reason) and shown
// in exports: the class name for a hold, the detail otherwise.
func (r Reason) String() string {
	if r.Detail == "" {
		return r.Class.String()
	}
	return r.Detail
}

// HoldOf returns the hold class whose stored text is exactly text, and
// false for any other text (a batch's own failure). Parked batches store
// their reason as text; a hold's text is its class name.
func HoldOf(text string) (Class, bool) {
	for c := Quarantined; c.Hold(); c++ {
		if c.String() == text {
			return c, true
		}
	}
	return 0, false
}
