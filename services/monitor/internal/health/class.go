package health

import (
	"fmt"

	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
)

// classCount is the number of error classes a Window counts separately;
// classes unknown to this build are counted as ERROR_CLASS_OTHER.
const classCount = int(eventv1.ErrorClass_ERROR_CLASS_OTHER) + 1

// kind is what an outcome means for the policy.
type kind uint8

const (
	// kindSuccess is a 2xx: it ends every run of failures.
	kindSuccess kind = iota
	// kindFailure is a 5xx or an unclassified failure: it counts toward the
	// error rate and the consecutive-failure run.
	kindFailure
	// kindUnreachable is a failure without any HTTP answer (timeout, refused
	// connection, TLS, DNS, blocked address): like kindFailure, and it also
	// feeds the unreachable rule.
	kindUnreachable
	// kindClient is a permanent 4xx: the destination is alive and rejects the
	// payload or our credentials. It counts toward the error rate only.
	kindClient
	// kindThrottled is a 429: the destination is alive and asks us to slow
	// down. It counts toward the throttled rule only.
	kindThrottled
)

// classOf maps classes unknown to this build to ERROR_CLASS_OTHER so they
// can index per-class counters.
func classOf(c eventv1.ErrorClass) eventv1.ErrorClass {
	if c < 0 || int(c) >= classCount {
		return eventv1.ErrorClass_ERROR_CLASS_OTHER
	}
	return c
}

// kindOf classifies a class already mapped by classOf.
func kindOf(c eventv1.ErrorClass) kind {
	switch c {
	case eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED:
		return kindSuccess
	case eventv1.ErrorClass_ERROR_CLASS_TIMEOUT,
		eventv1.ErrorClass_ERROR_CLASS_CONNECT,
		eventv1.ErrorClass_ERROR_CLASS_TLS,
		eventv1.ErrorClass_ERROR_CLASS_DNS,
		eventv1.ErrorClass_ERROR_CLASS_BLOCKED:
		return kindUnreachable
	case eventv1.ErrorClass_ERROR_CLASS_CLIENT:
		return kindClient
	case eventv1.ErrorClass_ERROR_CLASS_THROTTLED:
		return kindThrottled
	default:
		return kindFailure
	}
}

// countOf says "1 timeout" or "3 timeouts" for reasons operators read.
func countOf(n int64, c eventv1.ErrorClass) string {
	one, many := classWords(c)
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// classWords names a class in the singular and the plural.
func classWords(c eventv1.ErrorClass) (one, many string) {
	switch c {
	case eventv1.ErrorClass_ERROR_CLASS_UNSPECIFIED:
		return "success", "successes"
	case eventv1.ErrorClass_ERROR_CLASS_TIMEOUT:
		return "timeout", "timeouts"
	case eventv1.ErrorClass_ERROR_CLASS_CONNECT:
		return "connection failure", "connection failures"
	case eventv1.ErrorClass_ERROR_CLASS_TLS:
		return "TLS failure", "TLS failures"
	case eventv1.ErrorClass_ERROR_CLASS_DNS:
		return "DNS failure", "DNS failures"
	case eventv1.ErrorClass_ERROR_CLASS_SERVER:
		return "5xx response", "5xx responses"
	case eventv1.ErrorClass_ERROR_CLASS_THROTTLED:
		return "429 response", "429 responses"
	case eventv1.ErrorClass_ERROR_CLASS_CLIENT:
		return "4xx response", "4xx responses"
	case eventv1.ErrorClass_ERROR_CLASS_BLOCKED:
		return "blocked address", "blocked addresses"
	default:
		return "failure", "failures"
	}
}

// dominant returns the class with the largest count among those for which
// keep is true (the lowest class on a tie) and whether that class holds every
// kept count.
func dominant(counts *[classCount]int64, keep func(kind) bool) (c eventv1.ErrorClass, only bool) {
	var best, total int64
	for i, n := range counts {
		cls := eventv1.ErrorClass(i)
		if n == 0 || !keep(kindOf(cls)) {
			continue
		}
		total += n
		if n > best {
			best, c = n, cls
		}
	}
	return c, best == total
}
