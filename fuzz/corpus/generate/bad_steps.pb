
	flux-tiny08ÿÿÿÿÿÿÿÿÿP X ¢#a red circle on a yellow background